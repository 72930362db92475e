"""The HTTP layer on a fake replica: vLLM's shapes pass through, plus auth, tenants, RAG, limits, metrics."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import VLLMValidationError

from cluster.config import load_config
from cluster.errors import InvalidRequestError
from retrieval.config import IngestConfig, RetrievalConfig, SearchConfig
from retrieval.retriever import Retriever
from retrieval.testing import FakeEmbedder, InMemoryStore
from serve.config import hash_key
from serve.ingress import Ingress, LocalClient
from serve.registry import AdapterRegistry, open_registry
from tests.fakes import FakeReplica

KEYS = {"admin-key": ("ops", True), "acme-key": ("acme", False), "globex-key": ("globex", False)}
DOCS = [
    {"id": "codename", "text": "The internal codename of the ragtune project is Bluefin.", "source": "faq.md"},
    {"id": "tea", "text": "Green tea is brewed at eighty degrees.", "source": "kitchen.md"},
    {"id": "pump", "text": "The pump needs a new valve every spring.", "source": "ops.md"},
]


@dataclass
class App:
    client: TestClient
    replica: FakeReplica
    registry: AdapterRegistry


def _retriever() -> Retriever:
    """A real ``Retriever`` on the in-memory store and hashed-word embedder: public collection `docs`."""
    config = RetrievalConfig(search=SearchConfig(batch_wait_timeout_s=0.01), ingest=IngestConfig(show_progress=False))
    retriever = Retriever(config, embedder=FakeEmbedder(), store=InMemoryStore())
    assert asyncio.run(retriever.upsert_documents("docs", "ops", DOCS, public=True, admin=True)).added == 3
    return retriever


def _app(tmp_path, tiny_model, adapter_dirs, *overrides, keys=True, replica=None, retriever=None) -> App:
    store = tmp_path / "store"
    key_list = [{"sha256": hash_key(k), "tenant": t, "admin": a} for k, (t, a) in KEYS.items()] if keys else []
    cfg = load_config(None, ["serve.engine.model=tiny-llama", "serve.engine.max_model_len=256",
                             f"serve.adapters.store_uri={store}", f"serve.auth.keys={json.dumps(key_list)}", *overrides])
    registry = open_registry(str(store), base_model="tiny-llama", base_model_path=str(tiny_model))
    registry.register(adapter_dirs["alpha"], "alpha")
    registry.register(adapter_dirs["beta"], "acme-bot", owner="acme")
    replica = replica or FakeReplica()
    ingress = Ingress(cfg.serve, str(tiny_model), LocalClient(replica), retriever)
    # Loopback base URL: open mode (keys=False) answers only loopback Host headers (serve/hosts.py).
    return App(TestClient(ingress.build_asgi_app(), base_url="http://127.0.0.1"), replica, registry)


@pytest.fixture
def app(tmp_path, tiny_model, adapter_dirs) -> App:
    return _app(tmp_path, tiny_model, adapter_dirs)


@pytest.fixture
def client(app) -> TestClient:
    return app.client


@pytest.fixture
def rag_app(tmp_path, tiny_model, adapter_dirs) -> App:
    return _app(tmp_path, tiny_model, adapter_dirs, retriever=_retriever())


def _h(key="admin-key"):
    return {"Authorization": f"Bearer {key}"}


def _chat(model="tiny-llama", **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}


def _completion(model="tiny-llama", **kw):
    return {"model": model, "prompt": "hello", "max_tokens": 2, **kw}


def _events(client, path, body, key="admin-key") -> list[str]:
    """The ``data:`` payloads of one streamed response (after checking it is an SSE 200)."""
    with client.stream("POST", path, json=body, headers=_h(key)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def _error(r, status, type_=None, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if type_:
        assert err["type"] == type_
    if param:
        assert err["param"] == param
    return err


# ---- shapes: vLLM's objects come back ---------------------------------------------------------
def test_chat_shape_and_usage(app):
    r = app.client.post("/v1/chat/completions", json=_chat(n=2), headers=_h())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["message"]["content"] for c in body["choices"]] == [" w0 w1 w2"] * 2
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6
    assert "sources" not in body and "rag" not in body  # only with `rag`
    # The replica got vLLM's own request object, with the ingress's request id.
    request, route = app.replica.requests[-1], app.replica.routes[-1]
    assert type(request).__name__ == "ChatCompletionRequest" and request.n == 2
    assert route.adapter is None and route.context == [] and body["id"] == f"chatcmpl-{route.request_id}"


def test_completion_shape_names_the_adapter(app):
    r = app.client.post("/v1/completions", json=_completion("alpha"), headers=_h())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == " alpha@1:w0 alpha@1:w1"
    assert app.replica.routes[-1].adapter == "alpha@1"  # the registry key, not the client's name
    assert type(app.replica.requests[-1]).__name__ == "CompletionRequest"


def test_completion_stream_passthrough_with_usage(client):
    events = _events(client, "/v1/completions",
                     _completion("alpha", stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == " alpha@1:w0 alpha@1:w1"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_chat_stream_first_delta_has_role(client):
    events = _events(client, "/v1/chat/completions", _chat(stream=True))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "role" not in chunks[1]["choices"][0]["delta"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " w0 w1 w2"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_forced_usage_chunk_is_hidden_unless_asked(app, path):
    body = (_chat if path.endswith("chat/completions") else _completion)(stream=True)
    events = _events(app.client, path, body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)  # no usage-only chunk, no usage at all
    assert app.replica.requests[-1].stream_options.include_usage is True  # forced on for the metrics
    # ... and its counts reached the metrics although the client never saw them.
    text = app.client.get("/metrics", headers=_h()).text
    tokens = body["max_tokens"]
    assert f'ragtune_completion_tokens_total{{model="tiny-llama"}} {float(tokens)}' in text


def test_usage_chunk_shown_when_asked(app):
    events = _events(app.client, "/v1/chat/completions", _chat(stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c for c in chunks if not c["choices"]] == [chunks[-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert app.replica.requests[-1].stream_options.include_usage is True


def test_continuous_usage_is_kept_when_usage_is_forced(app):
    body = _chat(stream=True, stream_options={"continuous_usage_stats": True})
    chunks = [json.loads(e) for e in _events(app.client, "/v1/chat/completions", body)[:-1]]
    options = app.replica.requests[-1].stream_options
    assert options.include_usage is True and options.continuous_usage_stats is True
    assert all(c["choices"] for c in chunks) and chunks[-1]["usage"]["completion_tokens"] == 3


def test_mid_stream_failure_is_reported_in_band(tmp_path, tiny_model, adapter_dirs):
    app = _app(tmp_path, tiny_model, adapter_dirs, replica=FakeReplica(fail_after=2))
    events = _events(app.client, "/v1/chat/completions", _chat(stream=True))
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert set(err) == {"message", "type", "param", "code"} and "secret" not in err["message"]
    text = app.client.get("/metrics", headers=_h()).text
    assert 'ragtune_requests_total{endpoint="chat",model="tiny-llama",status="500"} 1.0' in text
    assert "ragtune_inflight_requests 0.0" in text


# ---- errors from the replica -------------------------------------------------------------------
def test_prompt_over_context_is_vllms_400(client):
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hello " * 400}, headers=_h())
    err = _error(r, 400, param="input_tokens")
    assert "maximum context length is 256 tokens" in err["message"] and err["code"] == 400


def test_replica_errors_keep_their_status(tmp_path, tiny_model, adapter_dirs):
    vllm_error = create_error_response(VLLMValidationError("no such thing", parameter="thing"))
    app = _app(tmp_path, tiny_model, adapter_dirs, replica=FakeReplica(error=vllm_error))
    for path, body in (("/v1/chat/completions", _chat(stream=True)), ("/v1/completions", _completion())):
        assert _error(app.client.post(path, json=body, headers=_h()), 400, param="thing")["message"].startswith(
            "no such thing")
    app.replica.error = InvalidRequestError("the replica says no", param="rag")
    assert _error(app.client.post("/v1/completions", json=_completion(), headers=_h()), 400, "invalid_request_error",
                  "rag")["message"] == "the replica says no"


def test_broken_adapter_fails_alone(app, adapter_dirs):
    app.registry.register(adapter_dirs["gamma"], "broken")
    err = _error(app.client.post("/v1/chat/completions", json=_chat("broken"), headers=_h()), 500, "server_error")
    assert err["code"] == "adapter_load_failed" and "/" not in err["message"]
    assert app.client.post("/v1/chat/completions", json=_chat("alpha"), headers=_h()).status_code == 200


# ---- auth and tenants --------------------------------------------------------------------------
def test_auth(client):
    _error(client.post("/v1/chat/completions", json=_chat()), 401, "authentication_error")
    _error(client.post("/v1/chat/completions", json=_chat(), headers=_h("wrong")), 401, "authentication_error")
    _error(client.post("/v1/completions", json=_completion(), headers={"Authorization": "Bearer "}), 401)
    _error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    _error(client.post("/tokenize", json={"prompt": "x"}), 401)
    assert client.get("/health").status_code == 200  # liveness needs no key
    _error(client.get("/metrics"), 401)
    _error(client.get("/metrics", headers=_h("acme-key")), 401)


def test_unknown_model_and_foreign_adapter_are_404(client):
    for model, key in (("nope", "admin-key"), ("acme-bot", "globex-key"), ("alpha@7", "acme-key")):
        for path, body in (("/v1/chat/completions", _chat(model)), ("/v1/completions", _completion(model))):
            _error(client.post(path, json=body, headers=_h(key)), 404, "not_found_error", "model")
    assert client.post("/v1/chat/completions", json=_chat("acme-bot"), headers=_h("acme-key")).status_code == 200


def test_name_at_version_pins_a_version(app, adapter_dirs):
    app.registry.register(adapter_dirs["gamma"], "alpha")  # v2, not promoted
    ran = {}
    for model in ("alpha", "alpha@1", "alpha@2", "alpha@v2"):
        r = app.client.post("/v1/completions", json=_completion(model, max_tokens=1), headers=_h("acme-key"))
        assert r.status_code == 200, r.text
        ran[model] = (app.replica.routes[-1].adapter, r.json()["choices"][0]["text"])
    assert ran == {"alpha": ("alpha@1", " alpha@1:w0"), "alpha@1": ("alpha@1", " alpha@1:w0"),
                   "alpha@2": ("alpha@2", " alpha@2:w0"), "alpha@v2": ("alpha@2", " alpha@2:w0")}
    _error(app.client.post("/v1/completions", json=_completion("alpha@two"), headers=_h()), 400, param="model")


def test_models_are_scoped_per_tenant(client):
    ids = lambda key: [m["id"] for m in client.get("/v1/models", headers=_h(key)).json()["data"]]  # noqa: E731
    assert ids("acme-key") == ["tiny-llama", "acme-bot", "alpha"]
    assert ids("globex-key") == ["tiny-llama", "alpha"]
    alpha = client.get("/v1/models", headers=_h("globex-key")).json()["data"][1]
    assert alpha["parent"] == "tiny-llama" and alpha["promoted_version"] == 1 and alpha["versions"] == [1]


def test_model_by_id(client):
    base = client.get("/v1/models/tiny-llama", headers=_h("acme-key")).json()
    assert base["id"] == "tiny-llama" and base["parent"] is None and base["max_model_len"] == 256
    assert client.get("/v1/models/acme-bot", headers=_h("acme-key")).json()["owned_by"] == "acme"
    for model, key in (("nope", "acme-key"), ("acme-bot", "globex-key")):
        _error(client.get(f"/v1/models/{model}", headers=_h(key)), 404, "not_found_error", "model")


def test_open_mode_without_keys(tmp_path, tiny_model, adapter_dirs):
    client = _app(tmp_path, tiny_model, adapter_dirs, keys=False).client
    assert client.post("/v1/chat/completions", json=_chat("acme-bot")).status_code == 200
    assert client.get("/metrics").status_code == 200


def test_adapter_admin_promote_rollback(app, adapter_dirs):
    client, registry = app.client, app.registry
    registry.register(adapter_dirs["gamma"], "alpha")
    r = client.post("/v1/adapters/alpha/promote", json={"version": 2}, headers=_h())
    assert r.json() == {"name": "alpha", "promoted": 2}
    out = client.post("/v1/completions", json=_completion("alpha", max_tokens=1), headers=_h()).json()
    assert out["choices"][0]["text"] == " alpha@2:w0"
    assert client.post("/v1/adapters/alpha/rollback", headers=_h()).json()["promoted"] == 1
    _error(client.post("/v1/adapters/acme-bot/promote", json={"version": 1}, headers=_h("globex-key")), 404)
    _error(client.post("/v1/adapters/alpha/promote", json={"version": 0}, headers=_h()), 400, param="version")
    assert client.post("/v1/adapters/alpha/load", headers=_h()).json() == {"loaded": "alpha@1"}
    assert app.replica.loaded[-1] == "alpha@1"


def test_tokenize_and_detokenize_resolve_the_adapter(app):
    r = app.client.post("/tokenize", json={"model": "alpha", "prompt": "a b c"}, headers=_h())
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 3 and app.replica.routes[-1].adapter == "alpha@1"
    r = app.client.post("/detokenize", json={"model": "tiny-llama", "tokens": [1, 2]}, headers=_h())
    assert r.json() == {"prompt": " t1 t2"} and app.replica.routes[-1].adapter is None
    _error(app.client.post("/tokenize", json={"model": "acme-bot", "prompt": "x"}, headers=_h("globex-key")), 404)


# ---- limits ------------------------------------------------------------------------------------
def test_max_tokens_cap_is_a_400_that_states_the_limit(tmp_path, tiny_model, adapter_dirs):
    client = _app(tmp_path, tiny_model, adapter_dirs, "serve.limits.max_tokens=100").client
    for path, body in (("/v1/chat/completions", _chat(max_tokens=101)),
                       ("/v1/chat/completions", {**_chat(), "max_tokens": None, "max_completion_tokens": 101}),
                       ("/v1/completions", _completion(max_tokens=101))):
        err = _error(client.post(path, json=body, headers=_h()), 400, "invalid_request_error", "max_tokens")
        assert "max_tokens=101 exceeds this server's limit of 100" in err["message"]
    assert client.post("/v1/completions", json=_completion(max_tokens=100), headers=_h()).status_code == 200


def test_stop_string_bounds_come_from_the_config(tmp_path, tiny_model, adapter_dirs):
    client = _app(tmp_path, tiny_model, adapter_dirs, "serve.limits.max_stop_chars=8",
                  "serve.limits.max_stop_strings=2").client
    assert client.post("/v1/completions", json=_completion(stop=["x" * 8, "y"]), headers=_h()).status_code == 200
    for stop in ("x" * 9, ["a", "b", "c"]):
        err = _error(client.post("/v1/completions", json=_completion(stop=stop), headers=_h()), 400, param="stop")
        assert "at most 2 stop strings of at most 8 characters" in err["message"]


def test_no_max_tokens_cap_by_default(client):
    # limits.max_tokens is None: only the context window bounds the answer (as vLLM does).
    assert client.post("/v1/completions", json=_completion(max_tokens=200), headers=_h()).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_n_over_max_n_is_400(client, path):
    body = (_chat if path.endswith("chat/completions") else _completion)(n=5)
    err = _error(client.post(path, json=body, headers=_h()), 400, "invalid_request_error", "n")
    assert "n=5 exceeds this server's limit of 4" in err["message"]


def test_body_limit_413(tmp_path, tiny_model, adapter_dirs):
    client = _app(tmp_path, tiny_model, adapter_dirs, "serve.limits.max_body_bytes=2048").client
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x" * 5000}, headers=_h())
    assert _error(r, 413)["code"] == "body_too_large"


def test_concurrent_arrivals_cannot_all_pass_the_limit(tmp_path, tiny_model, adapter_dirs):
    """Requests arriving together: the slot is taken before the first await (40 once passed a limit of 8)."""
    import asyncio

    import httpx

    app = _app(tmp_path, tiny_model, adapter_dirs, "serve.limits.max_concurrent_requests=2",
               replica=FakeReplica(delay_s=0.05))
    inner = app.client.app

    async def asgi(scope, receive, send):  # bodies arrive over a network: reading them yields
        async def slow_receive():
            await asyncio.sleep(0.01)
            return await receive()

        await inner(scope, slow_receive, send)

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=_chat(), headers=_h())
                                             for _ in range(10)))
        return sorted(r.status_code for r in replies)

    assert asyncio.run(burst()) == [200, 200] + [429] * 8


def test_overload_is_429_with_retry_after(tmp_path, tiny_model, adapter_dirs):
    app = _app(tmp_path, tiny_model, adapter_dirs, "serve.limits.max_concurrent_requests=1",
               replica=FakeReplica(delay_s=0.2))
    client = app.client
    # Hold one streaming request open, then a second one must be refused.
    with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True), headers=_h()) as first:
        assert first.status_code == 200
        r = client.post("/v1/chat/completions", json=_chat(), headers=_h())
        _error(r, 429, "rate_limit_error")
        assert r.headers["Retry-After"] == "1"
        assert "data: [DONE]" in list(first.iter_lines())
    assert client.post("/v1/chat/completions", json=_chat(), headers=_h()).status_code == 200
    text = client.get("/metrics", headers=_h()).text
    assert 'ragtune_requests_total{endpoint="chat",model="(unresolved)",status="429"} 1.0' in text
    assert "ragtune_inflight_requests 0.0" in text


# ---- metrics -----------------------------------------------------------------------------------
def test_metrics_count_requests_and_tokens_per_adapter(client):
    client.post("/v1/chat/completions", json=_chat("alpha"), headers=_h())
    client.post("/v1/chat/completions", json=_chat("alpha@1", stream=True), headers=_h())
    client.post("/v1/completions", json=_completion(), headers=_h())
    client.post("/v1/chat/completions", json=_chat("nope"), headers=_h())
    client.post("/v1/chat/completions", json=_chat("acme-bot"), headers=_h("globex-key"))
    text = client.get("/metrics", headers=_h()).text
    assert 'ragtune_requests_total{endpoint="chat",model="alpha",status="200"} 2.0' in text  # alpha and alpha@1
    assert 'ragtune_completion_tokens_total{model="alpha"} 6.0' in text
    assert 'ragtune_prompt_tokens_total{model="alpha"} 2.0' in text
    assert 'ragtune_requests_total{endpoint="completion",model="tiny-llama",status="200"} 1.0' in text
    assert 'ragtune_completion_tokens_total{model="tiny-llama"} 2.0' in text
    assert 'ragtune_time_to_first_token_seconds_count{model="alpha"} 1.0' in text  # the streamed one only
    assert "ragtune_inflight_requests 0.0" in text
    assert 'ragtune_requests_total{endpoint="chat",model="(unresolved)",status="404"} 2.0' in text
    # Client-chosen names never become label values (unbounded cardinality, other tenants' names).
    assert "nope" not in text and "acme-bot" not in text and "alpha@1" not in text


def test_metrics_include_the_engine_metrics(client):
    text = client.get("/metrics", headers=_h()).text
    assert 'vllm:num_requests_running{model_name="fake"} 0.0' in text and "ragtune_inflight_requests" in text


# ---- RAG ---------------------------------------------------------------------------------------
def _rag_chat(question="what is the internal codename of the project", **kw):
    return _chat(messages=[{"role": "user", "content": question}], rag={"collection": "docs", "top_k": 2}, **kw)


def test_rag_sources_on_the_body(rag_app):
    r = rag_app.client.post("/v1/chat/completions", json=_rag_chat(), headers=_h("acme-key"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rag"] == {"chunks_retrieved": 2, "chunks_used": 2, "chunks_dropped": 0}
    assert body["sources"][0]["document"] == "codename" and body["sources"][0]["source"] == "faq.md"
    assert {"id", "document", "source", "score", "text"} <= set(body["sources"][0])
    # The replica got the retrieved texts, best first.
    assert rag_app.replica.routes[-1].context == [s["text"] for s in body["sources"]]
    text = rag_app.client.get("/metrics", headers=_h()).text
    assert 'ragtune_rag_retrieval_seconds_count{mode="dense"} 1.0' in text  # the retrieval's own time


def test_rag_sources_only_what_fitted(tmp_path, tiny_model, adapter_dirs):
    app = _app(tmp_path, tiny_model, adapter_dirs, replica=FakeReplica(context_fits=1), retriever=_retriever())
    body = app.client.post("/v1/completions", json={**_completion(prompt="the internal codename"),
                                                    "rag": {"collection": "docs", "top_k": 3}}, headers=_h()).json()
    assert body["rag"] == {"chunks_retrieved": 3, "chunks_used": 1, "chunks_dropped": 2}
    assert [s["document"] for s in body["sources"]] == ["codename"]
    assert len(app.replica.routes[-1].context) == 3  # the replica decides what fits


def test_rag_sources_on_the_first_streamed_chunk_only(rag_app):
    events = _events(rag_app.client, "/v1/chat/completions", _rag_chat(stream=True), key="acme-key")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["sources"][0]["document"] == "codename" and chunks[0]["rag"]["chunks_used"] == 2
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("sources" not in c and "rag" not in c for c in chunks[1:])


def test_rag_unknown_collection_is_404(rag_app):
    r = rag_app.client.post("/v1/chat/completions", json=_chat(rag={"collection": "nope"}), headers=_h("acme-key"))
    _error(r, 404, "not_found_error")


def test_rag_needs_a_text_prompt(rag_app):
    r = rag_app.client.post("/v1/completions", json=_completion(prompt=[1, 2, 3], rag={"collection": "docs"}),
                            headers=_h())
    _error(r, 400, "invalid_request_error", "rag")


def test_rag_without_a_retriever_is_400(client):
    err = _error(client.post("/v1/chat/completions", json=_rag_chat(), headers=_h()), 400, "invalid_request_error",
                 "rag")
    assert "retrieval is not enabled" in err["message"]


@pytest.mark.parametrize(
    ("rag", "param"),
    [({"collection": "docs", "top_k": 0}, "rag.top_k"), ({"collection": "docs", "mode": "fuzzy"}, "rag.mode"),
     ({"collection": "docs", "colour": 1}, "rag.colour"), ({}, "rag.collection"), ("docs", "rag")],
)
def test_bad_rag_field_is_400_naming_it(client, rag, param):
    r = client.post("/v1/chat/completions", json=_chat(rag=rag), headers=_h())
    assert param in _error(r, 400, "invalid_request_error", param)["message"]


# ---- hostile client input: always a 4xx with an OpenAI-shaped body ---------------------------------
CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"


def _body(path: str, **extra) -> dict:
    if path == CHAT:
        return {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}
    return {"model": "tiny-llama", "prompt": "hi", "max_tokens": 1, **extra}


def _raw(path: str, **extra) -> bytes:
    return json.dumps(_body(path, **extra)).encode()


def _text_escape(path: str, escape: bytes) -> bytes:
    """The body with the prompt (or message content) replaced by raw JSON string bytes."""
    return _raw(path).replace(b'"hi"', b'"' + escape + b'"')


BOTH = (CHAT, COMPLETION)
HOSTILE_GENERATION = [  # (row, endpoints, body)
    ("invalid-utf8", BOTH, lambda p: _text_escape(p, b"\xff\xfe")),
    ("5000-digit-int", BOTH, lambda p: _raw(p).replace(b'"max_tokens": 1', b'"max_tokens": 1' + b"0" * 5000)),
    ("nested-5000-deep", BOTH, lambda p: _raw(p)[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("seed-2**70", BOTH, lambda p: _raw(p, seed=2**70)),
    ("min_tokens-1e9", BOTH, lambda p: _raw(p, min_tokens=1_000_000_000)),
    ("lone-surrogate-in-text", BOTH, lambda p: _text_escape(p, b"\\ud800")),
    ("lone-surrogate-in-model", BOTH, lambda p: _raw(p).replace(b'"tiny-llama"', b'"\\ud800"')),
    ("non-object-body", BOTH, lambda p: b"[1, 2]"),
    ("model-is-a-number", BOTH, lambda p: _raw(p, model=7)),
    ("text-is-null", BOTH, lambda p: _raw(p, **{"messages" if p == CHAT else "prompt": None})),
    # vLLM's own request validators raise VLLMValidationError, which is not a ValueError:
    ("stream_options-without-stream", BOTH, lambda p: _raw(p, stream_options={"include_usage": True})),
    ("top_logprobs-without-logprobs", (CHAT,), lambda p: _raw(p, top_logprobs=3)),
    ("tool_choice-required-without-tools", (CHAT,), lambda p: _raw(p, tool_choice="required")),
    ("json_schema-without-schema", (CHAT,), lambda p: _raw(p, response_format={"type": "json_schema"})),
]


def _assert_client_error(r) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.fixture
def hostile_client(tmp_path, tiny_model, adapter_dirs) -> TestClient:
    app = _app(tmp_path, tiny_model, adapter_dirs, retriever=_retriever())
    return TestClient(app.client.app, raise_server_exceptions=False)  # a 5xx is a status here, not a raise


@pytest.mark.parametrize(
    ("row", "path", "build"),
    [pytest.param(row, path, build, id=f"{row}-{'chat' if path == CHAT else 'completions'}")
     for row, paths, build in HOSTILE_GENERATION for path in paths],
)
def test_hostile_generation_input_is_a_4xx(hostile_client, row, path, build):
    r = hostile_client.post(path, content=build(path), headers={**_h(), "Content-Type": "application/json"})
    err = _assert_client_error(r)
    if row == "invalid-utf8":
        assert "UTF-8" in err["message"] and "byte" in err["message"]


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        pytest.param("POST", "/v1/embeddings", b'{"input": "\\ud800"}', id="embeddings-lone-surrogate"),
        pytest.param("POST", "/v1/embeddings", b'{"input": ["ok", "\\udfff"]}', id="embeddings-lone-surrogate-list"),
        pytest.param("PUT", "/v1/collections/docs%0A/documents", b'{"documents": [{"id": "a", "text": "x"}]}',
                     id="collection-path-newline"),
        pytest.param("DELETE", "/v1/collections/docs%0A/documents", b"", id="collection-path-newline-delete"),
        pytest.param("POST", CHAT, json.dumps(_body(CHAT, rag={"collection": "docs\n"})).encode(),
                     id="rag-collection-newline-chat"),
        pytest.param("POST", COMPLETION, json.dumps(_body(COMPLETION, rag={"collection": "docs\n"})).encode(),
                     id="rag-collection-newline-completions"),
    ],
)
def test_hostile_retrieval_input_is_a_4xx(hostile_client, method, path, raw):
    r = hostile_client.request(method, path, content=raw, headers={**_h(), "Content-Type": "application/json"})
    _assert_client_error(r)


# Routes whose body FastAPI itself parses (a pydantic body parameter), with one valid body each.
PARSED_ROUTES = {
    "embeddings": ("POST", "/v1/embeddings", {"input": "hi"}),
    "retrieve": ("POST", "/v1/retrieve", {"collection": "docs", "query": "hi"}),
    "put-documents": ("PUT", "/v1/collections/docs/documents", {"documents": [{"id": "a", "text": "hi"}]}),
    "delete-documents": ("DELETE", "/v1/collections/docs/documents", {"ids": ["hi"]}),
    "promote": ("POST", "/v1/adapters/alpha/promote", {"version": 1}),
}
HOSTILE_BODIES = {
    "invalid-utf8": lambda raw: raw[:-1] + b', "x": "\xff\xfe"}',
    "5000-digit-int": lambda raw: raw[:-1] + b', "x": 1' + b"0" * 5000 + b"}",
    "nested-5000-deep": lambda raw: raw[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "lone-surrogate": lambda raw: raw[:-1] + b', "x": "\\ud800"}',
    "non-object-body": lambda raw: b"[1, 2]",
}


@pytest.mark.parametrize("route", sorted(PARSED_ROUTES))
@pytest.mark.parametrize("row", sorted(HOSTILE_BODIES))
def test_hostile_body_on_parsed_routes_is_a_4xx(hostile_client, route, row):
    method, path, body = PARSED_ROUTES[route]
    raw = HOSTILE_BODIES[row](json.dumps(body).encode())
    r = hostile_client.request(method, path, content=raw, headers={**_h(), "Content-Type": "application/json"})
    _assert_client_error(r)


def test_valid_bodies_of_parsed_routes_still_work(hostile_client):
    for method, path, body in PARSED_ROUTES.values():
        r = hostile_client.request(method, path, json=body, headers=_h())
        assert r.status_code == 200, (path, r.text)
