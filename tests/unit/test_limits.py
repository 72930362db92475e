"""Request bounds: /v1/embeddings inputs, documents per PUT (retrieval.requests) and stop strings — 400s that state the limit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from cluster.config import load_config
from cluster.errors import InvalidRequestError
from retrieval.config import IngestConfig, RequestLimitsConfig, RetrievalConfig
from retrieval.retriever import Retriever
from retrieval.testing import FakeEmbedder, InMemoryStore
from serve.ingress import Ingress, LocalClient
from tests.fakes import FakeReplica

LIMITS = RequestLimitsConfig(max_embedding_inputs=3, max_embedding_input_chars=10, max_documents_per_put=2)


@pytest.fixture
def client(tmp_path, tiny_model) -> TestClient:
    cfg = load_config(None, ["serve.engine.model=tiny-llama", "serve.engine.max_model_len=256",
                             f"serve.adapters.store_uri={tmp_path / 'store'}"])
    retriever = Retriever(RetrievalConfig(requests=LIMITS, ingest=IngestConfig(show_progress=False)),
                          embedder=FakeEmbedder(), store=InMemoryStore())
    ingress = Ingress(cfg.serve, str(tiny_model), LocalClient(FakeReplica()), retriever)
    return TestClient(ingress.build_asgi_app(), base_url="http://127.0.0.1")  # open mode: loopback only


def _bad(r, param: str, *fragments: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    for fragment in fragments:
        assert fragment in err["message"], err["message"]
    return err["message"]


def test_defaults_and_config_path():
    limits = RetrievalConfig().requests
    assert (limits.max_embedding_inputs, limits.max_embedding_input_chars, limits.max_documents_per_put) == (256, 8192, 1000)
    cfg = load_config(None, ["retrieval.requests.max_documents_per_put=10"])
    assert cfg.retrieval.requests.max_documents_per_put == 10
    for bad in ({"max_embedding_inputs": 0}, {"max_documents_per_put": -1}, {"max_inputs": 5}):
        with pytest.raises(ValidationError):
            RequestLimitsConfig(**bad)
    for name, field in RequestLimitsConfig.model_fields.items():
        assert field.description, name


# ---- /v1/embeddings ------------------------------------------------------------------------------
def test_embeddings_within_limits(client):
    r = client.post("/v1/embeddings", json={"input": ["a", "b", "c" * 10]})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 3


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        (["a", "b", "c", "d"], ("input has 4 items", "limit is 3 per /v1/embeddings call")),
        (["ok", "x" * 11], ("input[1] has 11 characters", "limit is 10 per input")),
        ("y" * 11, ("input[0] has 11 characters", "limit is 10")),
    ],
)
def test_embeddings_over_limits(client, inputs, fragments):
    _bad(client.post("/v1/embeddings", json={"input": inputs}), "input", *fragments)


# ---- documents per PUT -----------------------------------------------------------------------------
def test_documents_per_put(client):
    docs = [{"id": f"d{i}", "text": f"text {i}"} for i in range(3)]
    assert client.put("/v1/collections/kb/documents", json={"documents": docs[:2]}).status_code == 200
    _bad(client.put("/v1/collections/kb/documents", json={"documents": docs}), "documents",
         "3 documents in one request", "limit is 2 per PUT")
    # The single-document route is one document by construction.
    assert client.put("/v1/collections/kb/documents/d9", json={"text": "nine"}).status_code == 200


# ---- stop strings (Ingress._check_limits) ----------------------------------------------------------
def _chat(**kw) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


@pytest.mark.parametrize("stop", [None, "x" * 256, ["a"] * 4, ["x" * 256, "y"]])
def test_stop_within_limits(client, stop):
    for path, body in (("/v1/chat/completions", _chat(stop=stop)),
                       ("/v1/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "stop": stop})):
        assert client.post(path, json=body).status_code == 200, path


@pytest.mark.parametrize(
    ("stop", "got"),
    [("x" * 257, "got 1, longest 257"), (["ok", "z" * 300], "got 2, longest 300")],
)
def test_stop_over_limits(client, stop, got):
    for path, body in (("/v1/chat/completions", _chat(stop=stop)),
                       ("/v1/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "stop": stop})):
        _bad(client.post(path, json=body), "stop", "at most 16 stop strings of at most 256 characters", got)


def test_stop_count(client):
    # vLLM's own request model already caps the list at VLLM_MAX_STOP_STRINGS (4 by default);
    # the ingress bound (16) holds when an operator raises that, so check it on the method itself.
    r = client.post("/v1/chat/completions", json=_chat(stop=["a"] * 17))
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("stop")
    ingress = SimpleNamespace(cfg=load_config(None, ["serve.engine.model=tiny-llama"]).serve)
    Ingress._check_limits(ingress, SimpleNamespace(stop=["a"] * 16, n=1, max_tokens=None))
    with pytest.raises(InvalidRequestError, match="got 17, longest 1") as info:
        Ingress._check_limits(ingress, SimpleNamespace(stop=["a"] * 17, n=1, max_tokens=None))
    assert info.value.param == "stop"
