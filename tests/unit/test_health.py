"""``/health`` reports the engine and the store; the Retriever's ``check_health`` asks the store."""

from __future__ import annotations

import asyncio

import pytest

from cluster.errors import OverloadedError
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


class _Engine:
    """The AsyncLLM calls the health and restart paths make; ``dead`` fails them as vLLM does."""

    def __init__(self, dead: bool = False):
        self.errored, self.closed = dead, False

    async def check_health(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.errored:
            raise EngineDeadError()

    def shutdown(self) -> None:
        self.closed = True


def _server(monkeypatch, engine: _Engine, starts: list[asyncio.Future]):
    """An ``LLMServer`` with only the health seam: ``start`` waits for the test to hand it an engine."""
    import serve.llm

    server = serve.llm.LLMServer.__new__(serve.llm.LLMServer)
    server._engine, server._restart, server._restarted_at = engine, None, None

    async def start():
        future = asyncio.get_running_loop().create_future()
        starts.append(future)
        server._engine = await future

    server.start = start
    exits: list[int] = []
    monkeypatch.setattr(serve.llm.os, "_exit", exits.append)
    monkeypatch.setattr(serve.llm.logging, "shutdown", lambda: None)  # keep pytest's log handlers open
    return server, exits


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_dead_engine_is_rebuilt_inside_the_replica_while_health_says_restarting(monkeypatch):
    from vllm.v1.engine.exceptions import EngineDeadError

    dead, starts = _Engine(dead=True), []
    server, exits = _server(monkeypatch, dead, starts)

    async def scenario():
        with pytest.raises(EngineDeadError):  # /health's probe only reports (→ 503)
            await server.engine_health()
        assert server._restart is None, "the probe does not restart"
        await server.check_health()  # Serve's hook: a restart begins, the replica stays
        await _settle()
        assert dead.closed and len(starts) == 1 and exits == []
        assert server._recovering()
        with pytest.raises(OverloadedError) as refused:  # requests and probes: 503 + Retry-After
            await server.engine_health()
        assert refused.value.status == 503 and refused.value.retry_after > 0
        await server.check_health()  # still restarting: passes, no second restart
        assert len(starts) == 1 and exits == []
        fresh = _Engine()
        starts[0].set_result(fresh)
        await _settle()
        await server.check_health()
        await server.engine_health()
        assert server._engine is fresh and not server._recovering() and exits == []

    asyncio.run(scenario())
    server._engine = None  # nothing for __del__ to shut down


def test_a_failed_restart_or_a_second_death_soon_after_ends_the_replica(monkeypatch):
    starts = []
    server, exits = _server(monkeypatch, _Engine(dead=True), starts)

    async def failing_restart():
        await server.check_health()
        await _settle()
        starts[0].set_exception(RuntimeError("engine core failed to start"))
        await _settle()
        await server.check_health()  # the failure is seen at the next check: Serve replaces the replica

    asyncio.run(failing_restart())
    assert exits == [1]

    starts = []
    server, exits = _server(monkeypatch, _Engine(dead=True), starts)

    async def dies_again():
        await server.check_health()
        await _settle()
        again = _Engine()
        starts[0].set_result(again)
        await _settle()
        again.errored = True  # dead again within the cooldown: no second in-place restart
        await server.check_health()

    asyncio.run(dies_again())
    assert exits[:1] == [1] and len(starts) == 1
    server._engine = None
