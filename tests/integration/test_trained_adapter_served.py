"""Training → serving: an adapter from `ragtune train` is hot-loaded by the running server."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """Run the tiny training recipe (2 workers, ZeRO-2) exporting into the server's store."""
    runs = tmp_path_factory.mktemp("runs")
    cmd = [sys.executable, "-m", "cluster.cli", "train", "train/configs/tiny-test.yaml",
           "--set", f"export.store={store.root}", "--set", f"run.storage_path={runs}",
           "--set", "run.name=served-e2e", "--set", "export.adapter_name=trained", "--set", "run.max_steps=20"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return store.resolve("trained")


def test_trained_adapter_is_served_without_restart(server, trained):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="admin-key", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert models["trained"].model_extra["parent"] == "tiny-llama"
    ask = dict(prompt="hello world the model", max_tokens=16, temperature=0)
    base = client.completions.create(model="tiny-llama", **ask).choices[0].text
    tuned = client.completions.create(model="trained", **ask).choices[0].text
    assert tuned != base
    manifest = server.get("/v1/adapters", headers={"Authorization": "Bearer admin-key"}).json()["data"]
    assert any(a["name"] == "trained" and a["promoted"] == trained.version for a in manifest)
