"""The LLM node lost under load on a two-node Ray cluster (head + worker raylets on loopback).

The split topology (``serve.topology: split``: the Ingress and the HTTP proxy on the head, the
LLM replica — vLLM CPU on the tiny model — on the worker node by ``serve.llm.node_labels``) is
deployed as ``ragtune serve`` deploys it (``serve.app.build_app``), with the proxy on the head
only: both nodes share 127.0.0.1 here, where a real cluster's per-node proxies each have their
own IP. Under steady load the worker node is SIGKILLed with everything on it; Serve reschedules
the replica on the surviving head (its label preference falls back to any node) and traffic
recovers. Measured: time from the kill to the first good answer, requests lost (in flight at the
kill) and refused while recovering (printed for the README reliability table).

Run: flock /tmp/ragtune-heavy.lock .venv/bin/pytest -m faults -s tests/faults/test_serve_node_loss.py
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.cluster_nodes import LOOPBACK, two_node_cluster  # first: Ray's loopback switch before `import ray`
from tests.conftest import MODELS, free_port

pytestmark = pytest.mark.faults

APP = "ragtune"
POOL = "ragtune-pool"
BODY = {"model": "tiny-llama", "prompt": "hello world the model", "max_tokens": 16, "temperature": 0}
RECOVERY_TIMEOUT_S = 300


def _config(store: str, port: int):
    from cluster.config import RagtuneConfig

    return RagtuneConfig.model_validate({
        "data_dir": str(MODELS.parent),
        "serve": {
            "http": {"host": LOOPBACK, "port": port},
            "topology": "split",
            "rag_enabled": False,  # the fault is the LLM node's; the Retriever has its own fault test
            "engine": {"model": "tiny-llama", "max_model_len": 512},
            "llm": {"node_labels": {POOL: "llm"}},
            "ingress": {"node_labels": {POOL: "api"}},
            "adapters": {"store_uri": store},
        },
    })


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    from ray import serve

    from cluster.local import wait_ready
    from serve.app import build_app

    with two_node_cluster(head_cpus=1, worker_cpus=1, head_labels={POOL: "api"}, worker_labels={POOL: "llm"}) as nodes:
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": LOOPBACK, "port": port})
        serve.run(build_app(_config(str(tmp_path_factory.mktemp("store")), port)), name=APP, route_prefix="/",
                  blocking=False)
        url = f"http://{LOOPBACK}:{port}"
        wait_ready(f"{url}/health", timeout_s=600)
        try:
            yield nodes, url
        finally:
            serve.shutdown()


def _replica_nodes(nodes, deployment: str) -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=nodes.dashboard_url, raise_on_missing_output=False, filters=[
        ("class_name", "=", f"ServeReplica:{APP}:{deployment}"), ("state", "=", "ALIVE")])
    return [a.node_id for a in actors]


def test_llm_node_killed_under_load_replica_rescheduled_on_the_head(stack):
    nodes, url = stack
    head, worker = nodes.head.node_id, nodes.worker.node_id
    assert _replica_nodes(nodes, "LLMServer") == [worker], "the LLM replica should start on the worker node"
    assert _replica_nodes(nodes, "Ingress") == [head]
    outcomes: list[tuple[float, float, int]] = []  # (start, end, status)
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=RECOVERY_TIMEOUT_S) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post(f"{url}/v1/completions", json=BODY)
                    status = r.status_code if r.status_code != 200 or r.json()["choices"] else -2  # -2: empty answer
                except httpx.HTTPError:
                    status = -1
                outcomes.append((started, time.monotonic(), status))
                if status != 200:
                    time.sleep(0.25)  # a client backing off, as Retry-After asks

    workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    warm = httpx.post(f"{url}/v1/completions", json=BODY, timeout=120)  # vLLM's first step takes seconds
    assert warm.status_code == 200, warm.text
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(outcomes) < 6:  # steady load: a few answers per client
        time.sleep(0.25)
    before = [st for _, _, st in list(outcomes)]
    assert len(before) >= 6 and all(st == 200 for st in before), f"load before the kill: {before[:10]}"
    killed_at = nodes.kill_worker()
    deadline = killed_at + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline and not any(b > killed_at and st == 200 for b, _, st in list(outcomes)):
        time.sleep(0.5)
    time.sleep(3)  # a few answers after recovery
    stop.set()
    for w in workers:
        w.join(timeout=RECOVERY_TIMEOUT_S)
    first_ok = min((end for begin, end, st in outcomes if begin > killed_at and st == 200), default=None)
    in_flight = [st for begin, end, st in outcomes if begin <= killed_at < end]
    in_flight_lost = [st for st in in_flight if st != 200]
    refused = [st for begin, _, st in outcomes if begin > killed_at and st != 200]
    after = [st for begin, _, st in outcomes if first_ok is not None and begin > first_ok]
    assert first_ok is not None, f"no good answer within {RECOVERY_TIMEOUT_S}s of the kill; statuses: {refused[:10]}"
    print(f"\nLLM node kill (split, 2 nodes): first good answer {first_ok - killed_at:.1f}s after the kill; in flight "
          f"at the kill: {len(in_flight)}, lost {len(in_flight_lost)} ({sorted(set(in_flight_lost))}); refused while "
          f"recovering: {len(refused)} ({sorted(set(refused))}); answered before the kill {len(before)}, after "
          f"recovery {after.count(200)}/{len(after)}")
    assert _replica_nodes(nodes, "LLMServer") == [head], "Serve rescheduled the replica on the surviving node"
    assert all(st in (429, 503) for st in refused if st != -1), "recovering answers are 503s, not 500s"
    assert after and all(st == 200 for st in after), f"traffic after recovery: {after[:10]}"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
