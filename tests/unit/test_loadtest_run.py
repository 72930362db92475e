"""The generator against the in-process fake server with known, injected delays and faults.

Tolerances are generous for a loaded 2-core machine, but one-sided where physics allows: a
measured delay can never be shorter than the injected one, so a lower bound just under it
catches wrong definitions (e.g. TTFT taken at the empty role chunk, TPOT over all tokens).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import statistics

import pytest

from loadtests.config import LoadShape, LoadTestConfig, MixEntry, PromptSpec, RagSpec, Slo
from loadtests.fake_server import FakeServer, FakeServerConfig
from loadtests.runner import arrival_gaps, run_loadtest, step_rng

CLIENTS = ["httpx", "aiohttp"] + (["httpx2"] if importlib.util.find_spec("httpx2") else [])


def _cfg(url: str, *, levels=(2,), requests=8, kind="concurrency", output_tokens=6, **kw) -> LoadTestConfig:
    kw.setdefault("mix", [MixEntry(model="m", weight=1)])
    kw.setdefault("prompts", PromptSpec(input_tokens=8, output_tokens=output_tokens, count=16))
    return LoadTestConfig(base_url=url, shape=LoadShape(kind=kind, levels=list(levels), requests=requests,
                                          duration_s=kw.pop("duration_s", 20)),
                          progress=False, plots=kw.pop("plots", False), **kw)


@pytest.fixture
def fake():
    servers = []

    def start(**kw) -> FakeServer:
        server = FakeServer(FakeServerConfig(**kw)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_timings_match_injected_delays(fake, tmp_path, client):
    server = fake(ttft_s=0.15, itl_s=0.03)  # 6 tokens: e2e = 0.15 + 5 × 0.03 = 0.30 s
    report = run_loadtest(_cfg(server.url, client=client), tmp_path)
    s = report.steps[0]
    assert (s.sent, s.ok) == (8, 8), report.warnings
    # Lower bounds are tight (a delay cannot be measured shorter); upper ones allow a loaded host.
    assert 148 <= s.ttft_ms["p50"] <= 400
    assert 29 <= s.itl_ms["p50"] <= 80
    assert 29 <= s.tpot_ms["p50"] <= 80  # (e2e − ttft)/(6 − 1); dividing by 6 would give < 25
    assert 298 <= s.e2e_ms["p50"] <= 700
    assert s.mean_output_tokens == 6 and s.mean_prompt_tokens == 8
    rec = report.records[0]
    assert len(rec.itl) == 5 and rec.content_chunks == 6


def test_completions_api(fake, tmp_path):
    server = fake(ttft_s=0.05)
    server.stats.keep_bodies = True
    report = run_loadtest(_cfg(server.url, api="completions", requests=4), tmp_path)
    assert report.steps[0].ok == 4 and report.steps[0].ttft_ms["p50"] >= 48
    assert "prompt" in server.stats.bodies[0] and "messages" not in server.stats.bodies[0]


def test_goodput_counts_requests_meeting_slo(fake, tmp_path):
    server = fake(ttft_s=0.02, rag_extra_ttft_s=0.6)  # RAG requests miss a 300 ms TTFT SLO
    cfg = _cfg(server.url, requests=12, levels=(6,), rag=RagSpec(fraction=0.5), slo=Slo(ttft_ms=300), seed=3)
    report = run_loadtest(cfg, tmp_path)
    s, plain = report.steps[0], sum(not r.rag for r in report.records)
    assert 0 < plain < 12 and s.ok == 12
    assert round(s.goodput_fraction * s.ok) == plain
    assert s.goodput_per_s == pytest.approx(plain / s.duration_s)


def test_http_errors_counted_per_status(fake, tmp_path):
    server = fake(error_every=4, error_status=503, model_errors={"missing": 404})
    cfg = _cfg(server.url, requests=40, mix=[MixEntry(model="m", weight=1), MixEntry(model="missing", weight=1)])
    s = run_loadtest(cfg, tmp_path).steps[0]
    assert s.errors == {str(k): v for k, v in server.stats.errors.items()}
    assert s.errors["404"] > 0 and s.errors["503"] > 0
    assert s.failed == sum(s.errors.values()) and s.ok == 40 - s.failed
    assert (tmp_path / "summary.md").read_text().count("404×") == 1


@pytest.mark.parametrize(("server_kw", "kind"), [
    ({"abort_after_tokens": 2, "ttft_s": 0.01}, "disconnected"),
    ({"stream": False}, "not_streaming"),
])
def test_broken_and_non_streaming_servers(fake, tmp_path, server_kw, kind):
    server = fake(**server_kw)
    s = run_loadtest(_cfg(server.url, requests=4), tmp_path).steps[0]
    assert s.errors == {kind: 4}


def test_unreachable_endpoint_still_writes_reports(fake, tmp_path):
    server = fake()
    url = server.url
    server.stop()  # nothing listens on this port any more
    report = run_loadtest(_cfg(url, requests=3, plots=True), tmp_path)
    assert report.steps[0].errors == {"connect_error": 3}
    data = json.loads((tmp_path / "report.json").read_text())
    assert len(data["records"]) == 3 and data["records"][0]["error"] == "connect_error"
    assert (tmp_path / "ttft_cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_usage_is_an_explicit_problem(fake, tmp_path):
    server = fake(include_usage=False)
    report = run_loadtest(_cfg(server.url, requests=4), tmp_path)
    s = report.steps[0]
    assert s.ok == 4 and s.problems == {"missing_usage": 4}
    assert s.tpot_ms["p50"] is None and s.output_tokens_per_s == 0
    assert any("no `usage`" in w for w in report.warnings)


def test_timeout_and_drain_cancel_are_bounded(fake, tmp_path):
    server = fake(ttft_s=5.0)
    cfg = _cfg(server.url, requests=2, levels=(1,), request_timeout_s=0.2)
    assert run_loadtest(cfg, tmp_path).steps[0].errors == {"timeout": 2}
    cfg = _cfg(server.url, requests=None, levels=(2,), duration_s=0.2, drain_timeout_s=0.2)
    s = run_loadtest(cfg, tmp_path).steps[0]
    assert s.errors == {"cancelled": 2} and s.duration_s < 2


def test_reports_json_markdown_png(fake, tmp_path):
    server = fake(ttft_s=0.05, itl_s=0.01, max_concurrent=2)  # saturates at 2 in flight: a knee
    report = run_loadtest(_cfg(server.url, levels=(1, 2, 4), requests=8, plots=True, slo=Slo(e2e_ms=5000)),
                          tmp_path)
    # Exactness is unit-tested in test_loadtest_metrics; here 2 vs 4 are within timing noise.
    assert report.knee in (2, 4)
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["level"] for s in data["steps"]] == [1, 2, 4] and len(data["records"]) == 24
    assert set(data["records"][0]) >= {"start", "ttft", "e2e", "itl", "status", "output_tokens", "model"}
    assert data["config"]["api_key"] is None
    md = (tmp_path / "summary.md").read_text()
    assert "| concurrency | sent | ok |" in md and f"**Knee: concurrency {report.knee:g}**" in md
    for name in ("latency_vs_load", "throughput_vs_load", "ttft_cdf"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("client", CLIENTS)
def test_fixed_concurrency_keeps_level_in_flight_on_keepalive_connections(fake, tmp_path, client):
    server = fake(ttft_s=0.02, error_every=5)  # error responses must not cost a connection either
    run_loadtest(_cfg(server.url, levels=(3,), requests=15, client=client), tmp_path)
    assert server.stats.max_in_flight == 3 and server.stats.requests == 15
    assert server.stats.connections == 3


def test_constant_rate_sends_the_right_number(fake, tmp_path):
    server = fake()
    s = run_loadtest(_cfg(server.url, kind="constant", levels=(40,), requests=None, duration_s=1.0),
                     tmp_path).steps[0]
    assert s.sent == 40 and server.stats.requests == 40  # sends scheduled at 0, 25, …, 975 ms
    assert 0.95 <= s.duration_s <= 2.0


def test_poisson_sends_follow_the_seeded_schedule(fake, tmp_path):
    server = fake()
    duration, rate = 1.0, 30.0
    expected, t = 0, 0.0
    for gap in arrival_gaps(rate, True, step_rng(5, 0)):  # replay the schedule the run will use
        if t >= duration:
            break
        expected, t = expected + 1, t + gap
    cfg = _cfg(server.url, kind="poisson", levels=(rate,), requests=None, duration_s=duration, seed=5)
    assert run_loadtest(cfg, tmp_path).steps[0].sent == expected


def test_arrival_gap_statistics():
    gaps = list(itertools.islice(arrival_gaps(50.0, True, random.Random(1)), 4000))
    assert statistics.mean(gaps) == pytest.approx(0.02, rel=0.08)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.1)  # exponential
    assert set(itertools.islice(arrival_gaps(50.0, False, random.Random(1)), 100)) == {0.02}


def test_mix_rag_and_output_control_in_bodies(fake, tmp_path):
    server = fake()
    server.stats.keep_bodies = True
    cfg = _cfg(server.url, requests=200, levels=(4,), mix=[MixEntry(model="a", weight=3), MixEntry(model="b", weight=1)],
               rag=RagSpec(fraction=0.25, collection="docs", top_k=3, mode="hybrid"))
    run_loadtest(cfg, tmp_path)
    assert 125 <= server.stats.by_model["a"] <= 175 and 25 <= server.stats.rag <= 75
    body = next(b for b in server.stats.bodies if "rag" in b)
    assert body["rag"] == {"collection": "docs", "top_k": 3, "mode": "hybrid"}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == body["min_tokens"] == 6 and body["ignore_eos"] is True


def test_jsonl_prompts(fake, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there"}\n\n{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}\n')
    server = fake()
    server.stats.keep_bodies = True
    cfg = _cfg(server.url, requests=2, levels=(1,), prompts=PromptSpec(source="jsonl", path=path))
    assert run_loadtest(cfg, tmp_path).steps[0].ok == 2
    assert [b["max_tokens"] for b in server.stats.bodies] == [64, 3]
    path.write_text('{"prompt": "ok"}\n{"text": 1}\n')
    with pytest.raises(Exception, match=r"p.jsonl:2: needs a non-empty 'prompt' string"):
        run_loadtest(cfg, tmp_path)
