"""The HTTP layer on a fake engine: OpenAI shapes, errors, auth, limits, metrics."""

import json

import pytest
from fastapi.testclient import TestClient

from cluster.config import load_config
from serve.config import hash_key
from serve.ingress import Ingress, LocalClient
from serve.llm import LLMServer
from serve.registry import open_registry
from tests.fakes import FakeEngine

KEYS = {"admin-key": ("ops", True), "acme-key": ("acme", False), "globex-key": ("globex", False)}


def _app(tmp_path, tiny_model, adapter_dirs, *overrides, keys=True, engine=None):
    store = tmp_path / "store"
    key_list = [{"sha256": hash_key(k), "tenant": t, "admin": a} for k, (t, a) in KEYS.items()] if keys else []
    cfg = load_config(None, ["serve.engine.model=tiny-llama", "serve.engine.max_model_len=256",
                             f"serve.adapters.store_uri={store}", f"serve.auth.keys={json.dumps(key_list)}", *overrides])
    registry = open_registry(str(store), base_model="tiny-llama", base_model_path=str(tiny_model))
    registry.register(adapter_dirs["alpha"], "alpha")
    registry.register(adapter_dirs["beta"], "acme-bot", owner="acme")
    server = LLMServer(cfg.serve.engine, str(tiny_model), str(store), engine=engine or FakeEngine())
    return TestClient(Ingress(cfg.serve, str(tiny_model), LocalClient(server)).build_asgi_app()), registry


@pytest.fixture
def client(tmp_path, tiny_model, adapter_dirs):
    return _app(tmp_path, tiny_model, adapter_dirs)[0]


def _h(key="admin-key"):
    return {"Authorization": f"Bearer {key}"}


def _chat(model="tiny-llama", **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}


def test_chat_shape_and_usage(client):
    r = client.post("/v1/chat/completions", json=_chat(n=2), headers=_h())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["message"]["content"] for c in body["choices"]] == [" w0 w1 w2"] * 2
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6


def test_completion_stream_sse(client):
    body = {"model": "alpha", "prompt": "hello", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body, headers=_h()) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == " alpha@1:w0 alpha@1:w1"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_chat_stream_first_delta_has_role(client):
    with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True), headers=_h()) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "role" not in chunks[1]["choices"][0]["delta"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def _error(r, status, type_=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if type_:
        assert err["type"] == type_
    if param:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "Field required"),
        (_chat(temperature=5), "temperature", "less than or equal to 2"),
        (_chat(logprobs=True), "logprobs", "Extra inputs are not permitted"),
        (_chat(max_tokens=100000), "max_tokens", "exceeds this server's limit of 1024"),
        (_chat(n=9), "n", "exceeds this server's limit of 4"),
        (_chat(stop=["a", "b", "c", "d", "e"]), "stop", "up to 4"),
        ({**_chat(), "messages": []}, "messages", "at least 1"),
        (_chat(rag={"collection": "docs"}), "rag", "retrieval is not enabled"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client, body, param, fragment):
    err = _error(client.post("/v1/chat/completions", json=body, headers=_h()), 400, "invalid_request_error", param)
    assert fragment in err["message"]


def test_bad_json_is_400(client):
    r = client.post("/v1/completions", content=b'{"model": ', headers={**_h(), "Content-Type": "application/json"})
    assert "not valid JSON" in _error(r, 400, "invalid_request_error")["message"]


def test_prompt_over_context_is_400_with_limit(client):
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hello " * 400}, headers=_h())
    err = _error(r, 400, "invalid_request_error", "prompt")
    assert "maximum context length is 256 tokens" in err["message"] and err["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 300}, headers=_h())
    assert "plus max_tokens=300" in _error(r, 400)["message"]


def test_unknown_model_and_foreign_adapter_are_404(client):
    for model, key in (("nope", "admin-key"), ("acme-bot", "globex-key"), ("alpha@7", "acme-key")):
        _error(client.post("/v1/chat/completions", json=_chat(model), headers=_h(key)), 404, "not_found_error", "model")
    assert client.post("/v1/chat/completions", json=_chat("acme-bot"), headers=_h("acme-key")).status_code == 200


def test_auth(client):
    _error(client.post("/v1/chat/completions", json=_chat()), 401, "authentication_error")
    _error(client.post("/v1/chat/completions", json=_chat(), headers=_h("wrong")), 401, "authentication_error")
    _error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    assert client.get("/health").status_code == 200  # liveness needs no key
    _error(client.get("/metrics", headers=_h("acme-key")), 401)


def test_models_are_scoped_per_tenant(client):
    ids = lambda key: [m["id"] for m in client.get("/v1/models", headers=_h(key)).json()["data"]]  # noqa: E731
    assert ids("acme-key") == ["tiny-llama", "acme-bot", "alpha"]
    assert ids("globex-key") == ["tiny-llama", "alpha"]
    alpha = client.get("/v1/models", headers=_h("globex-key")).json()["data"][1]
    assert alpha["parent"] == "tiny-llama" and alpha["promoted_version"] == 1


def test_open_mode_without_keys(tmp_path, tiny_model, adapter_dirs):
    client, _ = _app(tmp_path, tiny_model, adapter_dirs, keys=False)
    assert client.post("/v1/chat/completions", json=_chat("acme-bot")).status_code == 200


def test_adapter_admin_promote_rollback(tmp_path, tiny_model, adapter_dirs):
    client, registry = _app(tmp_path, tiny_model, adapter_dirs)
    registry.register(adapter_dirs["gamma"], "alpha")
    r = client.post("/v1/adapters/alpha/promote", json={"version": 2}, headers=_h())
    assert r.json() == {"name": "alpha", "promoted": 2}
    out = client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 1}, headers=_h()).json()
    assert out["choices"][0]["text"] == " alpha@2:w0"
    assert client.post("/v1/adapters/alpha/rollback", headers=_h()).json()["promoted"] == 1
    _error(client.post("/v1/adapters/acme-bot/promote", json={"version": 1}, headers=_h("globex-key")), 404)
    assert client.post("/v1/adapters/alpha/load", headers=_h()).json() == {"loaded": "alpha@1"}


def test_broken_adapter_fails_alone(tmp_path, tiny_model, adapter_dirs):
    engine = FakeEngine()
    client, registry = _app(tmp_path, tiny_model, adapter_dirs, engine=engine)
    registry.register(adapter_dirs["gamma"], "broken")
    err = _error(client.post("/v1/chat/completions", json=_chat("broken"), headers=_h()), 500, "server_error")
    assert err["code"] == "adapter_load_failed"
    assert client.post("/v1/chat/completions", json=_chat("alpha"), headers=_h()).status_code == 200


def test_body_limit_413(tmp_path, tiny_model, adapter_dirs):
    client, _ = _app(tmp_path, tiny_model, adapter_dirs, "serve.limits.max_body_bytes=2048")
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x" * 5000}, headers=_h())
    assert _error(r, 413)["code"] == "body_too_large"


def test_overload_is_429_with_retry_after(tmp_path, tiny_model, adapter_dirs):
    client, _ = _app(tmp_path, tiny_model, adapter_dirs, "serve.limits.max_concurrent_requests=1",
                     engine=FakeEngine(delay_s=0.2))
    # Hold one streaming request open, then a second one must be refused.
    with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True), headers=_h()) as first:
        assert first.status_code == 200
        r = client.post("/v1/chat/completions", json=_chat(), headers=_h())
        _error(r, 429, "rate_limit_error")
        assert r.headers["Retry-After"] == "1"
        list(first.iter_lines())
    assert client.post("/v1/chat/completions", json=_chat(), headers=_h()).status_code == 200


def test_metrics_count_requests_and_tokens(client):
    client.post("/v1/chat/completions", json=_chat("alpha"), headers=_h())
    client.post("/v1/chat/completions", json=_chat("nope"), headers=_h())
    text = client.get("/metrics", headers=_h()).text
    assert 'ragtune_requests_total{endpoint="chat",model="alpha",status="200"} 1.0' in text
    assert 'ragtune_completion_tokens_total{model="alpha"} 3.0' in text
    assert 'ragtune_time_to_first_token_seconds_count{model="alpha"} 1.0' in text
    assert 'ragtune_inflight_requests 0.0' in text
    assert 'ragtune_requests_total{endpoint="chat",model="(unresolved)",status="404"} 1.0' in text
    assert "nope" not in text  # client-chosen names never become label values
