"""`ragtune up` on its embedded defaults: the real SmolLM2 base model answers through the stack."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import REPO, free_port
from tests.servers import RagtuneServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    config = {
        "data_dir": str(REPO / "data"),
        "ray": {"dashboard_port": free_port()},
        "serve": {"http": {"host": "127.0.0.1", "port": free_port()},
                  "adapters": {"store_uri": str(tmp_path_factory.mktemp("store"))}},
    }
    with RagtuneServer(config, tmp_path_factory.mktemp("up"), command="up") as srv:
        yield srv


def test_up_prints_url_and_curl(up):
    log = up.log_path.read_text()
    assert f"at {up.url}" in log and "curl -s" in log


def test_base_model_answers_a_factual_question(up):
    """Guards the bf16-compiled trap (DESIGN.md): a wrong dtype/compile setting answers nonsense."""
    client = openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in out.choices[0].message.content
