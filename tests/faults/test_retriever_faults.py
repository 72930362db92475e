"""A Retriever replica SIGKILLed under RAG load (real Ray Serve + vLLM CPU + the tiny model + the
real embedder + milvus-lite's server on loopback, fused topology): Serve replaces the replica and
RAG requests recover; the time to the first good RAG answer after the kill and the requests lost
are measured (printed for the README table).

Run: flock /tmp/ragtune-heavy.lock .venv/bin/pytest -m faults -s tests/faults/test_retriever_faults.py
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from cluster.processes import RagtuneServer, free_port
from tests.conftest import MODELS

pytestmark = pytest.mark.faults

FACT = "The ragtune fault reactor is cooled by liquid basil oil at exactly 451 kelvin."
DOCS = [
    {"id": "reactor", "text": FACT, "source": "reactor.md"},
    {"id": "weather", "text": "Rain in the valley usually arrives from the west in the afternoon.", "source": "weather.md"},
    {"id": "trains", "text": "Trains to the harbour leave every twenty minutes from platform nine.", "source": "trains.md"},
]
RAG = {"model": "tiny-llama", "messages": [{"role": "user", "content": "How is the reactor cooled?"}],
       "max_tokens": 4, "temperature": 0, "rag": {"collection": "faults-kb", "top_k": 1}}


@pytest.fixture(scope="module")
def rag_stack(tmp_path_factory, tiny_model):
    config = {
        "data_dir": str(MODELS.parent),
        "ray": {"dashboard_port": free_port(), "num_cpus": 2},
        "retrieval": {"milvus": {"uri": str(tmp_path_factory.mktemp("milvus") / "kb.db")}},
        "milvus_lite": {"port": free_port()},
        "serve": {
            "http": {"host": "127.0.0.1", "port": free_port()},
            "topology": "fused",
            "engine": {"model": "tiny-llama", "max_model_len": 512},
            "adapters": {"store_uri": str(tmp_path_factory.mktemp("store"))},
        },
    }
    with RagtuneServer(config, tmp_path_factory.mktemp("faults-rag")) as srv:
        r = httpx.put(f"{srv.url}/v1/collections/faults-kb/documents", json={"documents": DOCS}, timeout=120)
        assert r.status_code == 200 and r.json()["failed"] == 0, r.text
        yield srv
        print(srv.tail(15))


def _good(response: httpx.Response) -> bool:
    """A RAG answer that really used the store: 200 and the reactor document as its source."""
    if response.status_code != 200:
        return False
    return [s["document"] for s in response.json().get("sources", [])] == ["reactor"]


def _retriever_replicas(root_pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            title = " ".join(proc.cmdline() or [proc.name()])
        except psutil.Error:
            continue
        if "ServeReplica" in title and "Retriever" in title:
            found.append(proc)
    return found


def test_retriever_replica_killed_under_rag_load(rag_stack):
    url = rag_stack.url
    with httpx.Client(timeout=60) as client:
        assert _good(client.post(f"{url}/v1/chat/completions", json=RAG)), "RAG must work before the fault"
    replicas = _retriever_replicas(rag_stack.proc.pid)
    assert len(replicas) == 1, f"expected one Retriever replica process, found {[p.pid for p in replicas]}"
    outcomes: list[tuple[float, float, int, bool]] = []  # (start, end, status, good)
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post(f"{url}/v1/chat/completions", json=RAG)
                    status, good = r.status_code, _good(r)
                except httpx.HTTPError:
                    status, good = -1, False
                outcomes.append((started, time.monotonic(), status, good))
                if not good:
                    time.sleep(0.25)  # a client backing off, as Retry-After asks

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    time.sleep(3)
    before = sum(1 for *_, good in outcomes if good)
    killed_at = time.monotonic()
    os.kill(replicas[0].pid, signal.SIGKILL)
    deadline = killed_at + 180
    while time.monotonic() < deadline and not any(a > killed_at and good for a, _, _, good in list(outcomes)):
        time.sleep(0.2)
    time.sleep(2)
    stop.set()
    for w in workers:
        w.join(timeout=150)
    first_good = min((end for begin, end, _, good in outcomes if begin > killed_at and good), default=None)
    in_flight = [(st, good) for begin, end, st, good in outcomes if begin <= killed_at < end]
    lost = [st for st, good in in_flight if not good]
    refused = [st for begin, _, st, good in outcomes if begin > killed_at and not good]
    assert before > 0, "no good RAG answer before the kill"
    assert first_good is not None, f"no good RAG answer within 180 s of the kill; statuses: {refused[:10]}"
    print(f"\nretriever replica kill: {before} good RAG answers before; first good RAG answer "
          f"{first_good - killed_at:.1f}s after the kill; in flight at the kill: {len(in_flight)}, lost: {len(lost)} "
          f"({sorted(set(lost))}); failed while recovering: {len(refused)} ({sorted(set(refused))})")
    assert all(st in (429, 503) for st in refused if st != -1), f"recovering answers are 503s, not 500s: {refused}"
    new = _retriever_replicas(rag_stack.proc.pid)
    assert new and replicas[0].pid not in {p.pid for p in new}, "Serve must have started a new replica"
    assert rag_stack.get("/health").status_code == 200
