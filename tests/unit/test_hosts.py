"""Open (no-keys) mode answers only loopback Host/Origin: a DNS-rebinding page cannot drive the API."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from cluster.config import load_config
from serve.config import hash_key
from serve.hosts import LoopbackHostGuard, is_loopback_host, is_loopback_origin
from serve.ingress import Ingress, LocalClient
from tests.fakes import FakeReplica

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True), ("127.0.0.1:8000", True), ("127.1.2.3:80", True), ("localhost", True),
        ("LOCALHOST:8000", True), ("[::1]", True), ("[::1]:8000", True), ("::1", True),
        ("", False), ("testserver", False), ("evil.example", False), ("evil.example:8000", False),
        ("localhost.evil.example", False), ("127.0.0.1.nip.io", False), ("0.0.0.0:8000", False),
        ("10.0.0.5:8000", False), ("[::]:8000", False), ("[::1]x", False), ("[::1]:", False),
        ("127.0.0.1:80x", False), ("127.0.0.1:123456", False), ("[127.0.0.1]", False), ("localhost.", False),
        ("user@127.0.0.1", False), ("127.0.0.1 ", False),
    ],
)
def test_loopback_hosts(host, ok):
    assert is_loopback_host(host) is ok


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("http://127.0.0.1:8000", True), ("https://localhost", True), ("http://[::1]:8000", True),
        ("HTTP://LOCALHOST:8000", True),
        ("null", False), ("http://evil.example", False), ("http://127.0.0.1.evil.example", False),
        ("file://", False), ("ftp://127.0.0.1", False), ("http://127.0.0.1:8000/", False),
        ("http://0.0.0.0:8000", False), ("127.0.0.1", False),
    ],
)
def test_loopback_origins(origin, ok):
    assert is_loopback_origin(origin) is ok


def _client(tmp_path, tiny_model, keys: bool, base_url: str) -> TestClient:
    key_list = [{"sha256": hash_key("k"), "tenant": "acme", "admin": True}] if keys else []
    cfg = load_config(None, ["serve.engine.model=tiny-llama", "serve.engine.max_model_len=256",
                             f"serve.adapters.store_uri={tmp_path / 'store'}", f"serve.auth.keys={json.dumps(key_list)}"])
    ingress = Ingress(cfg.serve, str(tiny_model), LocalClient(FakeReplica()))
    return TestClient(ingress.build_asgi_app(), base_url=base_url)


def _forbidden(r, code: str) -> str:
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "permission_error" and err["code"] == code
    return err["message"]


@pytest.mark.parametrize("base_url", ["http://127.0.0.1", "http://localhost:8000", "http://[::1]:8000"])
def test_open_mode_serves_loopback_hosts(tmp_path, tiny_model, base_url):
    client = _client(tmp_path, tiny_model, keys=False, base_url=base_url)
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    same_origin = {"Origin": base_url}
    assert client.post("/v1/adapters/nope/rollback", headers=same_origin).status_code == 404  # reached the route


def test_open_mode_refuses_a_rebound_host(tmp_path, tiny_model):
    client = _client(tmp_path, tiny_model, keys=False, base_url="http://evil.example:8000")
    for method, path in (("GET", "/health"), ("GET", "/metrics"), ("POST", "/v1/adapters/alpha/rollback")):
        message = _forbidden(client.request(method, path), "host_not_allowed")
        assert "'evil.example:8000' is not a loopback name" in message and "serve.auth.keys" in message
    # TestClient's default Host is refused too.
    _forbidden(TestClient(client.app).get("/health"), "host_not_allowed")


def test_open_mode_refuses_foreign_origins(tmp_path, tiny_model):
    client = _client(tmp_path, tiny_model, keys=False, base_url="http://127.0.0.1:8000")
    for origin in ("http://evil.example", "null", "http://0.0.0.0:8000"):
        r = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": origin})
        assert repr(origin) in _forbidden(r, "origin_not_allowed")


def test_open_mode_refuses_before_reading_the_body(tmp_path, tiny_model):
    # The guard is outermost: even an over-limit body gets the 403, not the 413.
    client = _client(tmp_path, tiny_model, keys=False, base_url="http://evil.example")
    _forbidden(client.post("/v1/chat/completions", content=b"x" * (2 << 20)), "host_not_allowed")


def test_every_host_and_origin_header_must_be_loopback():
    check = LoopbackHostGuard._check
    assert check([(b"host", b"127.0.0.1"), (b"host", b"evil.example")]) is not None
    assert check([(b"host", b"127.0.0.1"), (b"origin", b"http://localhost"), (b"origin", b"null")]) is not None
    assert check([(b"host", b"127.0.0.1"), (b"origin", b"http://localhost")]) is None
    assert check([]) is not None  # no Host at all (HTTP/1.0)


def test_with_keys_nothing_changes(tmp_path, tiny_model):
    client = _client(tmp_path, tiny_model, keys=True, base_url="http://api.example.com")
    headers = {"Authorization": "Bearer k", "Origin": "https://app.example.com"}
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 401  # keys still decide
