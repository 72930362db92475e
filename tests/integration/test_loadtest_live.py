"""The load generator against the real served stack (tiny model, a few requests)."""

from __future__ import annotations

import pytest

from loadtests.config import LoadShape, LoadTestConfig, MixEntry, PromptSpec
from loadtests.runner import run_loadtest

pytestmark = pytest.mark.integration


def test_loadtest_against_the_served_stack(server, tmp_path):
    cfg = LoadTestConfig(
        base_url=server.url, api_key="admin-key", progress=False,
        mix=[MixEntry(model="tiny-llama", weight=1), MixEntry(model="alpha", weight=1)],
        prompts=PromptSpec(input_tokens=16, output_tokens=8),
        shape=LoadShape(kind="concurrency", levels=[1, 4], requests=8),
    )
    report = run_loadtest(cfg, tmp_path)
    for step in report.steps:
        assert (step.sent, step.ok, step.failed) == (8, 8, 0), step.errors
        assert step.mean_output_tokens == 8  # from the server's usage, pinned by ignore_eos/min_tokens
        assert step.ttft_ms["p50"] > 0 and step.e2e_ms["p50"] >= step.ttft_ms["p50"]
    assert {r.model for r in report.records} == {"tiny-llama", "alpha"}
    assert all((tmp_path / name).exists() for name in ("report.json", "summary.md"))
    assert list(tmp_path.glob("*.png"))
