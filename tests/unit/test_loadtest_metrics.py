"""Metric definitions on hand-made records (no network): TPOT, goodput, percentiles, knee, SSE."""

from __future__ import annotations

import pytest

from loadtests.client import RequestRecord, _SseReader
from loadtests.config import Slo
from loadtests.metrics import StepResult, find_knee, meets_slo, percentiles, summarize_step, tpot


def _rec(i: int, ttft: float = 0.1, e2e: float = 0.5, tokens: int | None = 5, **kw) -> RequestRecord:
    kw.setdefault("status", 200)
    return RequestRecord(id=i, step=0, model="m", rag=False, ttft=ttft, e2e=e2e, output_tokens=tokens,
                         prompt_tokens=10, itl=[0.1] * 4, **kw)


def test_tpot_excludes_first_token():
    assert tpot(_rec(0, ttft=0.1, e2e=0.5, tokens=5)) == pytest.approx(0.1)  # 0.4 s over 4 tokens
    assert tpot(_rec(0, tokens=1)) is None
    assert tpot(_rec(0, tokens=None)) is None


def test_percentiles_linear_and_empty():
    p = percentiles([0.001 * v for v in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01) and p["mean"] == pytest.approx(50.5)
    assert percentiles([]) == {"p50": None, "p90": None, "p95": None, "p99": None, "mean": None}


def test_meets_slo():
    slo = Slo(ttft_ms=200, tpot_ms=120, e2e_ms=600)
    assert meets_slo(_rec(0), slo)
    assert not meets_slo(_rec(0, ttft=0.25), slo)
    assert not meets_slo(_rec(0, e2e=0.7), slo)  # also TPOT 150 ms
    assert not meets_slo(_rec(0, tokens=None), Slo(tpot_ms=120))  # no usage: TPOT unknown, not met
    assert meets_slo(_rec(0, tokens=1), Slo(tpot_ms=1))
    assert not meets_slo(_rec(0, error="http", status=503), Slo())


def test_summary_counts_errors_problems_and_goodput():
    recs = [_rec(0), _rec(1, ttft=0.3), _rec(2, tokens=None),
            RequestRecord(id=3, step=0, model="m", rag=False, status=503, error="http"),
            RequestRecord(id=4, step=0, model="m", rag=False, error="connect_error")]
    s = summarize_step(StepResult(0, "concurrency", 2, recs, started=1.0, ended=3.0, cpu_s=0.5),
                       Slo(ttft_ms=200))
    assert (s.sent, s.ok, s.failed) == (5, 3, 2) and s.error_rate == pytest.approx(0.4)
    assert s.errors == {"503": 1, "connect_error": 1}
    assert s.problems == {"missing_usage": 1}
    assert s.output_tokens_per_s == pytest.approx(10 / 2.0)  # 5+5 known tokens over 2 s
    assert s.requests_per_s == pytest.approx(1.5)
    assert s.goodput_per_s == pytest.approx(1.0) and s.goodput_fraction == pytest.approx(2 / 3)
    assert s.generator_cpu_pct == pytest.approx(25.0)
    assert summarize_step(StepResult(0, "concurrency", 1, recs, 0, 1), Slo()).goodput_per_s is None


def test_knee_is_where_throughput_flattens():
    def step(level, tps):
        s = summarize_step(StepResult(0, "concurrency", level, [], 0, 1), Slo())
        s.output_tokens_per_s = tps
        return s

    assert find_knee([step(1, 100), step(2, 190), step(4, 370), step(8, 390), step(16, 395)]) == 4
    assert find_knee([step(1, 100), step(2, 200)]) is None


def _reader(chat: bool = True) -> tuple[_SseReader, RequestRecord]:
    rec = RequestRecord(id=0, step=0, model="m", rag=False)
    return _SseReader(rec, t0=0.0, chat=chat), rec


def test_sse_reader_skips_role_chunk_and_reads_usage():
    reader, rec = _reader()
    reader.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n', 0.05)
    reader.feed(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\r\n\r\ndata: {"choices":[{"delta":', 0.2)
    reader.feed(b'{"content":" there"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":3,'
                b'"completion_tokens":2}}\n\n', 0.5)
    reader.feed(b"data: [DONE]\n\n", 0.6)
    assert rec.ttft == 0.2 and rec.itl == [pytest.approx(0.3)] and rec.e2e == 0.6
    assert (rec.prompt_tokens, rec.output_tokens, rec.content_chunks) == (3, 2, 2) and reader.done


def test_sse_reader_raises_on_error_event():
    reader, _ = _reader(chat=False)
    reader.feed(b'data: {"choices":[{"text":"a"}]}\n\n', 0.1)
    with pytest.raises(Exception, match="engine died"):
        reader.feed(b'data: {"error":{"message":"engine died","code":500}}\n\n', 0.2)
