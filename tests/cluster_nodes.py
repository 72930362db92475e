"""A two-node Ray cluster on loopback for the node-loss fault tests (tests/faults/test_*_node_loss.py).

Real raylets, not a simulation: Ray's own test utility ``ray.cluster_utils.Cluster`` starts a head
(GCS, raylet, dashboard on 127.0.0.1) and a worker raylet as separate processes on this machine,
and ``kill_worker()`` SIGKILLs the worker node's raylet and everything it runs — what a node lost
on a real cluster looks like to the head. Both nodes advertise 127.0.0.1 (DESIGN.md: Ray may rewrite
the node IP otherwise) and the dashboard binds loopback.

Logical CPUs per node decide placement the way GPUs do on a GPU cluster: with ``num_cpus=1`` on
each node, two 1-CPU training workers can only run one per node. Node labels let a deployment
prefer the worker node (``serve.<deployment>.node_labels``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cluster.processes import free_port

# Read by Ray at import time: set before the first `import ray` in this process (DESIGN.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__all__ = ["LOOPBACK", "TwoNodes", "two_node_cluster"]

LOOPBACK = "127.0.0.1"
# Ray's raylet heartbeat to the GCS: a SIGKILLed raylet is declared dead after ~5 missed checks of
# 3 s (Ray's defaults, kept: the figures measured here are the ones a real cluster would see).
_NODE_ARGS = {"node_ip_address": LOOPBACK, "object_store_memory": 200 * 2**20}


@dataclass
class TwoNodes:
    """The running cluster; ``worker`` is replaced by ``add_worker`` after a kill."""

    cluster: object  # ray.cluster_utils.Cluster
    head: object  # ray._private.node.Node
    worker: object | None
    dashboard_url: str
    worker_cpus: float
    worker_labels: dict[str, str]

    @property
    def address(self) -> str:
        return self.cluster.address

    def kill_worker(self) -> float:
        """Lose the worker node: SIGKILL its raylet, its Ray daemons and every process they started
        (actors, vLLM engine cores) with no drain, as a machine that goes away; return the time."""
        import psutil
        from ray._private import ray_constants

        raylet = self.worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        tree = psutil.Process(raylet).children(recursive=True)
        killed_at = time.monotonic()
        self.cluster.remove_node(self.worker, allow_graceful=False)
        for proc in tree:  # those of the node's processes the raylet's death did not already end
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.worker = None
        return killed_at

    def add_worker(self):
        """A (replacement) worker node, as an autoscaler or KubeRay would start one.

        Ray's ``Node`` installs SIGTERM/atexit hooks, which Python allows on the main thread only;
        a replacement added from a watcher thread (the main thread waits in ``trainer.fit()``)
        goes without them: ``cluster.shutdown()`` on exit stops it, and the head's reaper (same
        process group) does if this process dies.
        """
        hooks = self.cluster._shutdown_at_exit
        self.cluster._shutdown_at_exit = hooks and threading.current_thread() is threading.main_thread()
        try:
            self.worker = self.cluster.add_node(num_cpus=self.worker_cpus, labels=dict(self.worker_labels),
                                                **_NODE_ARGS)
        finally:
            self.cluster._shutdown_at_exit = hooks
        return self.worker

    def alive_nodes(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


@contextmanager
def two_node_cluster(head_cpus: float = 1, worker_cpus: float = 1, head_labels: dict[str, str] | None = None,
                     worker_labels: dict[str, str] | None = None) -> Iterator[TwoNodes]:
    """A head and a worker raylet on 127.0.0.1, this process connected as the driver.

    Everything started here is stopped on exit: the driver disconnects, then each node's
    processes are killed by the PIDs Ray recorded for them (never ``ray stop``: other engineers'
    Ray processes share this host).
    """
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("ray was imported before tests/cluster_nodes.py set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: "
                           "the nodes would advertise a non-loopback IP; import tests.cluster_nodes first")
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": True, "dashboard_host": LOOPBACK, "dashboard_port": port,
        "labels": dict(head_labels or {}), **_NODE_ARGS})
    nodes = TwoNodes(cluster, cluster.head_node, None, url, worker_cpus, dict(worker_labels or {}))
    try:
        nodes.add_worker()
        # Ray Train's placement-group cleaner and the state API find "the" cluster through the
        # dashboard: name ours (another Ray may run on this host).
        os.environ["RAY_API_SERVER_ADDRESS"] = url
        ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": url}})
        cluster.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        cluster.shutdown()  # each node's processes, by the PIDs Ray recorded
