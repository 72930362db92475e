"""`ragtune eval` end to end on the tiny model: the four arms through the served API, the report.

The random tiny model answers nonsense, so these tests check what the command measures and
writes (every arm asked every question, retrieval scored against gold documents, updates applied
before the freshness round, the scratch collection emptied), not the model's accuracy; the
shipped example's table on SmolLM2 is in the README (`make eval`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration
ARM_KEYS = {"accuracy", "citation_precision", "refusal_precision", "format_compliance", "freshness",
            "ttft_p50_ms", "e2e_p50_ms", "cost_per_1k_requests", "n"}
# Short documents: every retrieved chunk fits the tiny model's 512-token window (the shipped
# example's ~300-token documents do not, next to a question, on its tokenizer).
DOCS = {"fares.md": "# Fares\n\nA single crossing on the Verrin ferry costs 7 krona.\n",
        "fleet.md": "# Fleet\n\nThe Oriel is the only Verrin ferry with a bicycle deck.\n",
        "people.md": "# People\n\nThe harbourmaster of Harrow Quay is Ilse Varga.\n",
        "guide/routes.md": "# Routes\n\nThe Short Crossing runs from Harrow Quay to Millbeck.\n"}
QA = [{"id": "fare", "question": "What does a Verrin ferry crossing cost?", "answers": ["7 krona"], "documents": ["fares.md"]},
      {"id": "deck", "question": "Which ferry has a bicycle deck?", "answers": ["Oriel"], "documents": ["fleet.md"]},
      {"id": "hm", "question": "Who is the harbourmaster of Harrow Quay?", "answers": ["Ilse Varga"],
       "documents": ["people.md"]},
      {"id": "route", "question": "Where does the Short Crossing go?", "answers": ["Millbeck"],
       "documents": ["guide/routes.md"]},
      {"id": "none", "question": "What is the depth of the lake?", "answers": [], "documents": []}]
UPDATES = [{"document": "fares.md", "text": "# Fares\n\nSince May a single Verrin ferry crossing costs 9 krona.\n",
            "questions": [{"question": "What does a Verrin ferry crossing cost now?", "answers": ["9 krona"]}]}]


@pytest.fixture
def corpus(tmp_path):
    docs = tmp_path / "docs"
    for name, text in DOCS.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QA))
    (tmp_path / "updates.jsonl").write_text("".join(json.dumps(u) + "\n" for u in UPDATES))
    return tmp_path


def _eval(corpus, out, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.cli", "eval", "--docs", str(corpus / "docs"), "--qa",
           str(corpus / "qa.jsonl"), "--updates", str(corpus / "updates.jsonl"), "--style-regex",
           r"^\[ragtune\]", "--max-tokens", "8", "--top-k", "2", "--no-progress", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_eval_of_a_running_deployment(server, corpus, tmp_path):
    """--url with a tenant key and an existing adapter: all four arms, the report and its files."""
    out = tmp_path / "out"
    run = _eval(corpus, out, "--url", server.url, "--adapter", "acme-bot", env={"RAGTUNE_API_KEY": "acme-key"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["arms"]) == ["base", "rag", "ft", "ft+rag"] and report["skipped"] == {}
    for name, arm in report["arms"].items():
        assert set(arm) >= ARM_KEYS, name
        assert arm["n"] == len(QA) and arm["n_fresh"] == 1 and arm["errors"] == 0, name
        assert arm["e2e_p50_ms"] > 0 and arm["cost_per_1k_requests"] > 0
    assert report["arms"]["ft"]["model"] == "acme-bot" and report["arms"]["base"]["model"] == "tiny-llama"
    # Retrieval is scored on every answerable question against its gold document (MiniLM is real):
    # the gold document ids are the paths `ragtune ingest` gives, subfolders included.
    assert report["arms"]["rag"]["hit_at_k"]["n"] == 4 and report["arms"]["rag"]["hit_at_k"]["mean"] == 1.0
    assert report["arms"]["base"]["hit_at_k"]["mean"] is None

    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 * (len(QA) + 1)
    for a in answers:  # every rag request got its chunks into the prompt; no plain request got any
        if a["arm"].endswith("rag"):
            assert a["rag"]["chunks_used"] == len(a["sources"]) == 2, a
        else:
            assert a["sources"] == [] and a["rag"] is None, a
    # The freshness round ran after the update landed: the retrieved fares chunk holds the new fare.
    fare = next(a for a in answers if a["arm"] == "rag" and a["phase"] == "fresh")
    assert any("9 krona" in s["text"] for s in fare["sources"] if s["document"] == "fares.md")
    assert not any("7 krona" in s["text"] for s in fare["sources"])
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| ft+rag |" in md and "## Recommendation" in md and report["recommendation"]["lines"]
    # The scratch collection is emptied afterwards.
    hits = httpx.post(f"{server.url}/v1/retrieve", headers={"Authorization": "Bearer acme-key"}, timeout=60,
                      json={"collection": report["settings"]["collection"], "query": "ferry fare"})
    assert hits.status_code == 404 or hits.json()["data"] == []


def test_eval_skips_an_arm_it_cannot_run_and_says_why(server, corpus, tmp_path):
    run = _eval(corpus, tmp_path, "--url", server.url, "--arms", "base,ft", "--adapter", "no-such-adapter",
                env={"RAGTUNE_API_KEY": "acme-key"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["arms"]) == ["base"]
    assert "no-such-adapter" in report["skipped"]["ft"] and "not served" in report["skipped"]["ft"]
    assert "- ft: adapter 'no-such-adapter' is not served" in (tmp_path / "report.md").read_text()


def test_eval_trains_its_adapter_and_starts_its_own_stack(corpus, tmp_path, tiny_model):
    """No --url: `ragtune train` (DeepSpeed, the tiny recipe) first, then a local stack that serves it."""
    store = tmp_path / "store"
    stack = ["--set", "serve.engine.model=tiny-llama", "--set", "serve.engine.max_model_len=512",
             "--set", f"serve.adapters.store_uri={store}", "--set", "ray.num_cpus=2"]
    train = ["--train", str(REPO / "train" / "examples" / "ragtune-style.jsonl"),
             "--train-config", str(REPO / "train" / "configs" / "tiny-test.yaml"),
             "--train-set", "run.max_steps=4", "--train-set", "eval.every_steps=2",
             "--train-set", "run.checkpoint_every_steps=2"]
    run = _eval(corpus, tmp_path / "out", *stack, *train, "--arms", "base,ft,ft+rag")
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    adapter = report["settings"]["adapter"]
    assert adapter.startswith("eval-ft-") and (store / adapter).is_dir()
    assert list(report["arms"]) == ["base", "ft", "ft+rag"] and report["arms"]["ft"]["model"] == adapter
    assert all(arm["errors"] == 0 for arm in report["arms"].values())
