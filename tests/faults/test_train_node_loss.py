"""A training node lost mid-run on a two-node Ray cluster (head + worker raylets on loopback).

The tiny recipe on 2 DeepSpeed workers, one per node (each node advertises 1 CPU and each worker
asks for 1, as one GPU per node and one worker per GPU would force on a GPU cluster). After the
first checkpoint the worker node is SIGKILLed with everything on it; a replacement node joins
(as an autoscaler or KubeRay would start one) and Ray Train restarts the worker group from the
last reported checkpoint (``run.max_failures``) — the code path a GPU cluster takes. The run ends
at the configured step with a loss close to an uninterrupted run on the same cluster, and the
time lost to the fault is measured against that run (printed for the README reliability table).

Run: flock /tmp/ragtune-heavy.lock .venv/bin/pytest -m faults -s tests/faults/test_train_node_loss.py
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.cluster_nodes import two_node_cluster  # first: it sets Ray's loopback switch before `import ray`
from tests.integration.training import checkpoint_metrics, tiny_config, wait_for
from train.launch import launch

pytestmark = pytest.mark.faults

MAX_STEPS = 16
CHECKPOINT_EVERY = 4
REPLACEMENT_AFTER_S = 5.0  # the replacement node is asked for this long after the loss


@pytest.fixture(scope="module")
def nodes(tiny_model):
    with two_node_cluster(head_cpus=1, worker_cpus=1) as cluster:
        yield cluster


def _config(workdir: Path, name: str):
    return tiny_config(workdir, name, f"run.max_steps={MAX_STEPS}", f"run.checkpoint_every_steps={CHECKPOINT_EVERY}",
                       f"eval.every_steps={CHECKPOINT_EVERY}", "run.num_to_keep=null", "run.max_failures=2",
                       "tracking.mlflow=false", "export.enabled=false")


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return list(checkpoint_metrics(run_dir, missing_ok=True))


def _eval_losses(run_dir: Path) -> dict[int, float]:
    return {step: m["eval_loss"] for step, m in checkpoint_metrics(run_dir).items()}


def _worker_nodes(nodes) -> list[str]:
    """Node ids of the live Ray Train workers."""
    from ray.util.state import list_actors

    actors = list_actors(address=nodes.dashboard_url, filters=[("class_name", "=", "RayTrainWorker"),
                                                               ("state", "=", "ALIVE")], raise_on_missing_output=False)
    return sorted(a.node_id for a in actors)


class NodeLoss(threading.Thread):
    """Watches the run; after its first checkpoint kills the worker node, then adds a replacement."""

    def __init__(self, nodes, run_dir: Path):
        super().__init__(daemon=True)
        self.nodes, self.run_dir, self.error = nodes, run_dir, None
        self.placement: list[str] = []
        self.killed_at = self.replaced_at = self.regrouped_at = None
        self.checkpoint_at_kill = 0

    def run(self) -> None:
        try:
            self.placement = wait_for(lambda: (ids := _worker_nodes(self.nodes)) and len(ids) == 2 and ids,
                                   "2 training workers running", every_s=1)
            self.checkpoint_at_kill = wait_for(lambda: max(_checkpoint_steps(self.run_dir), default=0),
                                            "a first checkpoint")
            time.sleep(1.0)  # a step or two past the checkpoint: work the fault throws away
            self.checkpoint_at_kill = max(_checkpoint_steps(self.run_dir))
            self.killed_at = self.nodes.kill_worker()
            time.sleep(REPLACEMENT_AFTER_S)
            node = self.nodes.add_worker()
            self.replaced_at = time.monotonic()
            wait_for(lambda: node.node_id in _worker_nodes(self.nodes), "a worker on the replacement node", every_s=0.5)
            self.regrouped_at = time.monotonic()
        except Exception as exc:  # surfaced by the test, not lost in the thread
            self.error = exc


def test_worker_node_lost_mid_run_resumes_from_the_last_checkpoint(nodes, tmp_path):
    head = nodes.head.node_id
    started = time.monotonic()
    reference = launch(_config(tmp_path, "reference"))
    reference_s = time.monotonic() - started

    run_dir = tmp_path / "results" / "node-loss"
    fault = NodeLoss(nodes, run_dir)
    fault.start()
    started = time.monotonic()
    outcome = launch(_config(tmp_path, "node-loss"))
    faulted_s = time.monotonic() - started
    fault.join(timeout=60)
    assert fault.error is None, fault.error
    assert fault.killed_at is not None, "the run ended before the worker node was killed"

    lost_worker = [n for n in fault.placement if n != head]
    assert head in fault.placement and len(lost_worker) == 1, f"not one worker per node: {fault.placement}"
    m = outcome.metrics
    assert m["step"] == MAX_STEPS and reference.metrics["step"] == MAX_STEPS
    # Resumed from the checkpoint that was the latest when the node died (a step-N checkpoint
    # may land between that read and the kill: then from that one).
    assert m["resumed_from_step"] in (fault.checkpoint_at_kill, fault.checkpoint_at_kill + CHECKPOINT_EVERY)
    assert m["resumed_from_workers"] is None  # the same 2 workers again: no universal-checkpoint conversion
    ours, ref = _eval_losses(run_dir), _eval_losses(tmp_path / "results" / "reference")
    assert ours[fault.checkpoint_at_kill] == pytest.approx(ref[fault.checkpoint_at_kill], abs=1e-6)
    # Same 2 workers after the restart, the same data order from the restored step: the curve
    # continues where it left off (tolerance for gloo's reduction order across new processes).
    assert ours[MAX_STEPS] == pytest.approx(ref[MAX_STEPS], abs=0.05)
    assert m["loss"] == pytest.approx(reference.metrics["loss"], abs=0.05)
    print(f"\ntraining node loss: 2 workers on 2 nodes, worker node SIGKILLed after the step-{fault.checkpoint_at_kill} "
          f"checkpoint, replacement node added {REPLACEMENT_AFTER_S:.0f}s later; workers regrouped "
          f"{fault.regrouped_at - fault.killed_at:.1f}s after the kill, resumed from step {m['resumed_from_step']}, "
          f"finished step {m['step']}; wall {faulted_s:.1f}s vs {reference_s:.1f}s uninterrupted "
          f"(time lost {faulted_s - reference_s:.1f}s); eval loss at step {MAX_STEPS} {ours[MAX_STEPS]:.4f} vs "
          f"{ref[MAX_STEPS]:.4f}")
