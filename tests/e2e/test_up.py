"""`ragtune up` on its embedded defaults: the real SmolLM2 base model and the sample knowledge."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
import yaml

from cluster.processes import RagtuneServer
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    data = tmp_path_factory.mktemp("milvus")
    config = {
        "data_dir": str(REPO / "data"),
        "ray": {"dashboard_port": free_port()},
        "serve": {"http": {"host": "127.0.0.1", "port": free_port()},
                  "adapters": {"store_uri": str(tmp_path_factory.mktemp("store"))}},
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
