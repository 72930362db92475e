"""`ragtune up` on its embedded defaults: the real SmolLM2 base model and the sample knowledge."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import httpx
import openai
import pytest
import yaml
from pydantic import BaseModel

from cluster.processes import RagtuneServer
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.e2e


DEMO_STORE = REPO / "data" / "adapters"


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    data = tmp_path_factory.mktemp("milvus")
    # A copy of the store `make setup` fills (the demo adapter), so tests that register may write to it.
    assert (DEMO_STORE / ".demo-ragtune-style").exists(), "run `make setup`: it trains the demo adapter"
    store = tmp_path_factory.mktemp("store") / "adapters"
    shutil.copytree(DEMO_STORE, store)
    config = {
        "data_dir": str(REPO / "data"),
        "ray": {"dashboard_port": free_port()},
        "serve": {"http": {"host": "127.0.0.1", "port": free_port()},
                  "adapters": {"store_uri": str(store)}},
        "retrieval": {"milvus": {"uri": str(data / "kb.db")}},
        "milvus_lite": {"port": free_port()},
    }
    with RagtuneServer(config, tmp_path_factory.mktemp("up"), command="up") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0)


def test_up_prints_url_and_curl(up):
    log = up.log_path.read_text()
    assert f"at {up.url}" in log and "curl -s" in log
    assert "sample knowledge base" in log


def test_base_model_answers_a_factual_question(client):
    """Guards the bf16-compiled trap (DESIGN.md): a wrong dtype/compile setting answers nonsense."""
    out = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in out.choices[0].message.content


def test_rag_answers_from_the_sample_knowledge(client):
    """Only the shipped documents know the codename; RAG brings it, with its source."""
    question = [{"role": "user", "content": "What is the internal codename of the ragtune project?"}]
    out = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=40,
                                         messages=question, extra_body={"rag": {"collection": "ragtune-docs", "top_k": 3}})
    sources = out.model_extra["sources"]
    assert any("codename" in s["source"] for s in sources)
    assert "Quillwort" in out.choices[0].message.content


CODENAME = [{"role": "user", "content": "What is the internal codename of the ragtune project?"}]
SAMPLE_RAG = {"rag": {"collection": "ragtune-docs", "top_k": 3}}


def test_the_four_calls_from_the_first_start(client):
    """base, base + RAG, the demo adapter, adapter + RAG — the README's four calls, as `make up` serves them."""
    served = {m.id: m for m in client.models.list().data}
    assert "ragtune-style" in served and served["ragtune-style"].model_extra["parent"] == "smollm2-135m-instruct"

    def ask(model, extra=None):
        out = client.chat.completions.create(model=model, temperature=0, max_tokens=48, messages=CODENAME,
                                             extra_body=extra)
        return out.choices[0].message.content, [s["document"] for s in (out.model_extra or {}).get("sources", [])]

    base, base_rag, tuned, tuned_rag = (ask("smollm2-135m-instruct"), ask("smollm2-135m-instruct", SAMPLE_RAG),
                                        ask("ragtune-style"), ask("ragtune-style", SAMPLE_RAG))
    assert "Quillwort" not in base[0] and not base[1]
    assert "Quillwort" in base_rag[0] and any("codename" in d for d in base_rag[1])
    assert tuned[0].startswith("[ragtune]") and not base[0].startswith("[ragtune]")  # the trained format
    assert tuned_rag[0].startswith("[ragtune]") and any("codename" in d for d in tuned_rag[1])


def test_ingest_while_serving_shares_the_store(up, client, tmp_path):
    """`ragtune ingest` next to a running stack connects to the same milvus-lite server."""
    doc = tmp_path / "lighthouse.md"
    doc.write_text("# Lighthouse\n\nThe lighthouse keeper of ragtune island is named Ottoline Vex.\n")
    cfg_path = up.workdir / "ragtune.yaml"
    assert yaml.safe_load(cfg_path.read_text())["milvus_lite"]["port"]
    cmd = [sys.executable, "-m", "cluster.cli", "ingest", str(doc), "--collection", "island", "--config", str(cfg_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["added"] == 1
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert json.loads(again.stdout[again.stdout.index("{"):])["unchanged"] == 1
    out = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                         messages=[{"role": "user", "content": "Who is the lighthouse keeper?"}],
                                         extra_body={"rag": {"collection": "island", "top_k": 1}})
    assert out.model_extra["sources"][0]["document"].endswith("lighthouse.md") or out.model_extra["sources"][0]["source"].endswith("lighthouse.md")


def test_the_printed_curl_answers_sensibly_every_time(up):
    """The banner's curl sends no temperature: the model's own sampling defaults must apply."""
    log = up.log_path.read_text()
    body = json.loads(re.search(r"-d '(\{.*?\})'", log, re.S).group(1))
    assert "temperature" not in body
    answers = [httpx.post(f"{up.url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"]
               for _ in range(4)]
    assert all("Paris" in a for a in answers), answers


@pytest.fixture(scope="module")
def adapter(up, tmp_path_factory):
    """A small random LoRA on SmolLM2, registered while the stack runs (served as name@1)."""
    from cluster.models import make_random_lora
    from serve.registry import open_registry

    base = REPO / "data" / "models" / "smollm2-135m-instruct"
    src = make_random_lora(base, tmp_path_factory.mktemp("lora") / "nudge", seed=3, scale=0.01)
    store = open_registry(up.config["serve"]["adapters"]["store_uri"], base_model="smollm2-135m-instruct",
                          base_model_path=str(base))
    return store.register(src, "nudge").key


class Capital(BaseModel):
    country: str
    capital: str


CAPITAL_TOOL = openai.pydantic_function_tool(Capital, name="record_capital", description="Record a country's capital")


@pytest.fixture(params=["base", "adapter"])
def model(request, adapter):
    return "smollm2-135m-instruct" if request.param == "base" else adapter


def test_json_object_and_parse(client, model):
    ask = [{"role": "user", "content": "Give the capital of France as JSON with keys country and capital."}]
    raw = client.chat.completions.create(model=model, messages=ask, max_tokens=64, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(raw.choices[0].message.content), dict)
    parsed = client.beta.chat.completions.parse(model=model, messages=ask, max_tokens=64, temperature=0,
                                                response_format=Capital)
    assert isinstance(parsed.choices[0].message.parsed, Capital)


def test_required_tool_call_and_its_history(client, model):
    ask = [{"role": "user", "content": "Record the capital of France."}]
    out = client.chat.completions.create(model=model, messages=ask, max_tokens=96, temperature=0, tools=[CAPITAL_TOOL],
                                         tool_choice="required")
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "record_capital"
    Capital.model_validate_json(call.function.arguments)
    history = [*ask, out.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "recorded"}]
    again = client.chat.completions.create(model=model, messages=history, max_tokens=16, temperature=0, tools=[CAPITAL_TOOL])
    assert again.choices[0].message.content or again.choices[0].message.tool_calls


def test_logprobs_count(client, model):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [len(t.top_logprobs) for t in out.choices[0].logprobs.content] == [2, 2, 2, 2]


def test_rag_with_structured_output(client, model):
    question = [{"role": "user", "content": "What is the internal codename of the ragtune project? Answer as JSON."}]
    schema = {"type": "object", "properties": {"codename": {"type": "string", "maxLength": 40}},
              "required": ["codename"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=model, messages=question, max_tokens=96, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "codename", "schema": schema}},
        extra_body={"rag": {"collection": "ragtune-docs", "top_k": 3}})
    assert "codename" in json.loads(out.choices[0].message.content)
    assert any("codename" in s["source"] for s in out.model_extra["sources"])
