"""``/health`` reports the engine and the store; the Retriever's ``check_health`` asks the store."""

from __future__ import annotations

import asyncio

import pytest

from retrieval.retriever import Retriever
from retrieval.testing import FakeEmbedder, InMemoryStore
from tests.unit.test_ingress import _app, _retriever


class DownStore(InMemoryStore):
    def ping(self, timeout_s: float = 5.0) -> None:
        raise ConnectionError("milvus is down")


def test_health_is_ok_when_engine_and_store_answer(tmp_path, tiny_model, adapter_dirs):
    client = _app(tmp_path, tiny_model, adapter_dirs, retriever=_retriever()).client
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "tiny-llama", "engine": "ok", "store": "ok"}


def test_health_without_retrieval_says_so(tmp_path, tiny_model, adapter_dirs):
    r = _app(tmp_path, tiny_model, adapter_dirs).client.get("/health")
    assert (r.status_code, r.json()["store"]) == (200, "disabled")


def test_store_down_is_degraded_not_dead(tmp_path, tiny_model, adapter_dirs):
    retriever = Retriever(embedder=FakeEmbedder(), store=DownStore())
    r = _app(tmp_path, tiny_model, adapter_dirs, retriever=retriever).client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "degraded" and r.json()["store"] == "unavailable"


def test_engine_down_is_a_503(tmp_path, tiny_model, adapter_dirs):
    app = _app(tmp_path, tiny_model, adapter_dirs, retriever=_retriever())
    app.replica.healthy = False
    r = app.client.get("/health")
    assert r.status_code == 503 and r.json()["engine"] == "unavailable" and r.json()["status"] == "error"


def test_retriever_check_health_raises_when_the_store_is_down():
    asyncio.run(Retriever(embedder=FakeEmbedder(), store=InMemoryStore()).check_health())  # no ping: fine
    with pytest.raises(ConnectionError):
        asyncio.run(Retriever(embedder=FakeEmbedder(), store=DownStore()).check_health())


class _DeadEngine:
    """The one AsyncLLM call the health paths make, failing as vLLM's does once its core died."""

    async def check_health(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        raise EngineDeadError()


def test_a_dead_engine_fails_the_probe_and_ends_the_replica_only_from_serves_hook(monkeypatch):
    import serve.llm

    server = serve.llm.LLMServer.__new__(serve.llm.LLMServer)  # no engine start: only the health seam
    server._engine = _DeadEngine()
    exits: list[int] = []
    monkeypatch.setattr(serve.llm.os, "_exit", exits.append)
    monkeypatch.setattr(serve.llm.logging, "shutdown", lambda: None)  # keep pytest's log handlers open
    from vllm.v1.engine.exceptions import EngineDeadError

    with pytest.raises(EngineDeadError):  # /health's probe reports (→ 503) and never exits
        asyncio.run(server.engine_health())
    assert exits == []
    asyncio.run(server.check_health())  # Serve's hook: the replica process ends, Serve replaces it
    assert exits == [1]
    server._engine = None  # nothing for __del__ to shut down
