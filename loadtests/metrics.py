"""Per-step metrics, with the field's usual definitions (also in loadtests/README.md).

* **TTFT** — request sent → first chunk with non-empty content (the role-only first chat chunk
  does not count). Includes queueing, retrieval (RAG), prefill and network.
* **TPOT** — per request, excluding the first token: ``(e2e − ttft) / (output_tokens − 1)``,
  ``output_tokens`` from the response's ``usage`` (requests with one token or no usage: none).
* **ITL** — gaps between consecutive content chunks, pooled over the step's requests.
* **e2e** — request sent → ``data: [DONE]``.
* **output tokens/s** — Σ ``usage.completion_tokens`` of successful requests ÷ step wall time
  (first send → last completion). **requests/s** — successful requests ÷ the same wall time.
* **error rate** — failed ÷ sent, broken down by HTTP status or error kind.
* **goodput** — successful requests meeting every SLO set ÷ wall time (DistServe's definition);
  a request without usage cannot show its TPOT and so does not meet a TPOT SLO.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from loadtests.client import RequestRecord
from loadtests.config import Slo

__all__ = ["PERCENTILES", "StepResult", "StepSummary", "find_knee", "meets_slo", "percentiles",
           "summarize_step", "tpot"]

PERCENTILES = (50, 90, 95, 99)


@dataclass
class StepResult:
    """What one load step produced: its records plus the generator's own health figures."""

    index: int
    kind: str
    level: float
    records: list[RequestRecord]
    started: float
    ended: float
    cpu_s: float = 0.0
    max_lag_s: float = 0.0


@dataclass
class StepSummary:
    """One step's metrics; latency dicts hold ``p50``/``p90``/``p95``/``p99``/``mean`` in ms."""

    index: int
    kind: str
    level: float
    sent: int
    ok: int
    failed: int
    error_rate: float
    errors: dict[str, int]
    problems: dict[str, int]
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    goodput_per_s: float | None
    goodput_fraction: float | None
    mean_prompt_tokens: float | None
    mean_output_tokens: float | None
    ttft_ms: dict[str, float | None] = field(default_factory=dict)
    tpot_ms: dict[str, float | None] = field(default_factory=dict)
    itl_ms: dict[str, float | None] = field(default_factory=dict)
    e2e_ms: dict[str, float | None] = field(default_factory=dict)
    generator_cpu_pct: float = 0.0
    max_send_lag_ms: float = 0.0


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p95/p99 and mean (linear interpolation), times ``scale``; ``None`` when empty."""
    if not values:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None}
    arr = np.asarray(values, dtype=float) * scale
    out = {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True)}
    out["mean"] = float(arr.mean())
    return out


def tpot(rec: RequestRecord) -> float | None:
    """Time per output token after the first, seconds; ``None`` without usage or with < 2 tokens."""
    if rec.ttft is None or rec.e2e is None or not rec.output_tokens or rec.output_tokens < 2:
        return None
    return (rec.e2e - rec.ttft) / (rec.output_tokens - 1)


def meets_slo(rec: RequestRecord, slo: Slo) -> bool:
    """Whether a request succeeded and met every SLO that is set."""
    if not rec.ok or rec.ttft is None:
        return False
    if slo.ttft_ms is not None and rec.ttft * 1000 > slo.ttft_ms:
        return False
    if slo.e2e_ms is not None and (rec.e2e is None or rec.e2e * 1000 > slo.e2e_ms):
        return False
    if slo.tpot_ms is not None:
        if rec.output_tokens == 1:
            return True  # no second token: nothing to hold against a TPOT objective
        value = tpot(rec)
        return value is not None and value * 1000 <= slo.tpot_ms
    return True


def _mean(values: list[int]) -> float | None:
    return float(np.mean(values)) if values else None


def _problems(ok: list[RequestRecord]) -> dict[str, int]:
    problems = {"missing_usage": sum(r.output_tokens is None for r in ok),
                "no_content": sum(r.ttft is None for r in ok)}
    return {k: v for k, v in problems.items() if v}


def _goodput(ok: list[RequestRecord], slo: Slo, duration: float) -> tuple[float | None, float | None]:
    if slo.ttft_ms is None and slo.tpot_ms is None and slo.e2e_ms is None:
        return None, None
    good = sum(meets_slo(r, slo) for r in ok)
    return good / duration, (good / len(ok) if ok else 0.0)


def summarize_step(step: StepResult, slo: Slo) -> StepSummary:
    """All metrics of one step (see the module docstring for definitions)."""
    recs = step.records
    ok = [r for r in recs if r.ok]
    duration = max(step.ended - step.started, 1e-9)
    tokens = [r.output_tokens for r in ok if r.output_tokens is not None]
    goodput, fraction = _goodput(ok, slo, duration)
    tpots = [t for t in map(tpot, ok) if t is not None]
    return StepSummary(
        index=step.index, kind=step.kind, level=step.level, sent=len(recs), ok=len(ok),
        failed=len(recs) - len(ok), error_rate=(len(recs) - len(ok)) / len(recs) if recs else 0.0,
        errors=dict(Counter(r.error_key for r in recs if not r.ok).most_common()),
        problems=_problems(ok), duration_s=duration, requests_per_s=len(ok) / duration,
        output_tokens_per_s=sum(tokens) / duration, goodput_per_s=goodput, goodput_fraction=fraction,
        mean_prompt_tokens=_mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        mean_output_tokens=_mean(tokens),
        ttft_ms=percentiles([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=percentiles(tpots), itl_ms=percentiles([g for r in ok for g in r.itl]),
        e2e_ms=percentiles([r.e2e for r in ok if r.e2e is not None]),
        generator_cpu_pct=100.0 * step.cpu_s / duration, max_send_lag_ms=1000.0 * step.max_lag_s)


def find_knee(steps: list[StepSummary], share: float = 0.9) -> float | None:
    """The load level past which more load buys little throughput.

    The lowest level whose output tokens/s (requests/s when no tokens were counted) reaches
    ``share`` of the best step's; beyond it latency grows while throughput stays flat.
    ``None`` with fewer than three steps or no throughput.
    """
    if len(steps) < 3:
        return None
    ordered = sorted(steps, key=lambda s: s.level)
    metric = "output_tokens_per_s" if any(s.output_tokens_per_s for s in ordered) else "requests_per_s"
    best = max(getattr(s, metric) for s in ordered)
    if best <= 0:
        return None
    return next(s.level for s in ordered if getattr(s, metric) >= share * best)
