"""Load-test reports: JSON (every request, for re-analysis), a Markdown summary, PNG plots."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from loadtests.client import RequestRecord
from loadtests.config import LoadTestConfig
from loadtests.metrics import StepResult, StepSummary, find_knee, summarize_step

__all__ = ["Report", "build_report", "markdown_summary", "write_reports"]

_CPU_WARN_PCT = 85.0  # a generator this busy may be the bottleneck, not the server
_LAG_WARN_MS = 100.0


@dataclass
class Report:
    """A finished run: config (key redacted), per-step summaries, every request, and warnings."""

    config: dict
    started_at: str
    environment: dict
    steps: list[StepSummary]
    records: list[RequestRecord]
    knee: float | None
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def step(self, level: float) -> StepSummary:
        """The summary of the step run at ``level``."""
        return next(s for s in self.steps if s.level == level)


def _warnings(steps: list[StepSummary]) -> list[str]:
    out = []
    for s in steps:
        tag = f"{s.kind}={s.level:g}"
        if s.problems.get("missing_usage"):
            out.append(f"{tag}: {s.problems['missing_usage']} successful requests had no `usage` — token "
                       "metrics (TPOT, tokens/s) exclude them; does the server honour "
                       "stream_options.include_usage?")
        if s.problems.get("no_content"):
            out.append(f"{tag}: {s.problems['no_content']} successful requests streamed no content")
        if s.errors:
            out.append(f"{tag}: {s.failed}/{s.sent} requests failed: "
                       + ", ".join(f"{k}×{v}" for k, v in s.errors.items()))
        if s.generator_cpu_pct > _CPU_WARN_PCT and s.duration_s >= 1.0:  # shorter: start-up dominates
            out.append(f"{tag}: the generator used {s.generator_cpu_pct:.0f}% of a core — it may be the "
                       "bottleneck (try --client aiohttp, or several generator processes)")
        if s.max_send_lag_ms > _LAG_WARN_MS:
            out.append(f"{tag}: sends slipped up to {s.max_send_lag_ms:.0f} ms behind schedule")
    return out


def build_report(cfg: LoadTestConfig, steps: list[StepResult], started_at: datetime,
                 loop: str = "asyncio") -> Report:
    """Summarise the steps of a run into a :class:`Report` (no files written)."""
    summaries = [summarize_step(s, cfg.slo) for s in steps]
    env = {"client": cfg.client, "event_loop": loop, "python": sys.version.split()[0],
           "platform": platform.platform(), "host": platform.node(), "cpus": os.cpu_count()}
    config = cfg.model_dump(mode="json")
    config["api_key"] = "***" if cfg.api_key else None
    return Report(config=config, started_at=started_at.isoformat(timespec="seconds"), environment=env,
                  steps=summaries, records=[r for s in steps for r in s.records],
                  knee=find_knee(summaries), warnings=_warnings(summaries))


def _record_json(rec: RequestRecord) -> dict:
    out = {k: getattr(rec, k) for k in RequestRecord.__slots__}
    for key in ("start", "ttft", "e2e"):
        if out[key] is not None:
            out[key] = round(out[key], 6)
    out["itl"] = [round(g, 6) for g in rec.itl]
    return out


def report_json(report: Report) -> dict:
    """The JSON document: definitions in ``README.md``; times in seconds, summaries in ms."""
    return {"config": report.config, "started_at": report.started_at, "environment": report.environment,
            "knee": report.knee, "warnings": report.warnings,
            "steps": [asdict(s) for s in report.steps],
            "records": [_record_json(r) for r in report.records]}


def _ms(d: dict, key: str) -> str:
    value = d.get(key)
    return "—" if value is None else f"{value:.1f}"


def _row(s: StepSummary) -> str:
    goodput = "—" if s.goodput_per_s is None else f"{s.goodput_per_s:.2f} ({100 * s.goodput_fraction:.0f}%)"
    cells = [f"{s.level:g}", str(s.sent), str(s.ok), f"{100 * s.error_rate:.1f}%", f"{s.requests_per_s:.2f}",
             f"{s.output_tokens_per_s:.1f}", goodput,
             *(_ms(s.ttft_ms, p) for p in ("p50", "p90", "p95", "p99")),
             _ms(s.tpot_ms, "p50"), _ms(s.tpot_ms, "p99"), _ms(s.itl_ms, "p50"), _ms(s.itl_ms, "p99"),
             _ms(s.e2e_ms, "p50"), _ms(s.e2e_ms, "p99")]
    return "| " + " | ".join(cells) + " |"


def markdown_summary(report: Report) -> str:
    """The Markdown summary: one row per step, then errors, warnings and definitions."""
    cfg, env = report.config, report.environment
    unit = "concurrency" if cfg["shape"]["kind"] == "concurrency" else "req/s"
    mix = ", ".join(f"{m['model']}={m['weight']:g}" for m in cfg["mix"])
    slo = ", ".join(f"{k}={v:g}" for k, v in cfg["slo"].items() if v is not None) or "none"
    lines = [f"# Load test — {report.started_at}", "",
             f"Target `{cfg['base_url']}` ({cfg['api']}), shape `{cfg['shape']['kind']}`, "
             f"client {env['client']} on {env['event_loop']}, mix {mix}, "
             f"RAG on {100 * cfg['rag']['fraction']:.0f}% of requests, SLO {slo}.", "",
             f"| {unit} | sent | ok | errors | req/s | out tok/s | goodput req/s | TTFT p50 | TTFT p90 | "
             "TTFT p95 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 | ITL p99 | e2e p50 | e2e p99 |",
             "|" + "---|" * 17]
    lines += [_row(s) for s in report.steps]
    lines += ["", "Latencies in ms. TPOT = (e2e − TTFT)/(output tokens − 1), tokens from `usage`; "
              "goodput = successful requests meeting every SLO, per second. Definitions: "
              "loadtests/README.md."]
    if report.knee is not None:
        lines += ["", f"**Knee: {unit} {report.knee:g}** — the lowest load reaching 90% of the best "
                      "throughput; more load past it mostly adds latency."]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    gen = ", ".join(f"{s.level:g}: {s.generator_cpu_pct:.0f}% CPU, lag {s.max_send_lag_ms:.0f} ms"
                    for s in report.steps)
    lines += ["", f"Generator health per step — {gen}."]
    return "\n".join(lines) + "\n"


def write_reports(report: Report, out_dir: Path, plots: bool = True) -> dict[str, str]:
    """Write ``report.json``, ``summary.md`` and (if ``plots``) the PNGs; returns name → path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "report.json", "markdown": out_dir / "summary.md"}
    files["json"].write_text(json.dumps(report_json(report), indent=1) + "\n")
    files["markdown"].write_text(markdown_summary(report))
    if plots:
        from loadtests.plots import write_plots  # matplotlib is imported only when plotting

        files.update(write_plots(report, out_dir))
    return {k: str(v) for k, v in files.items()}
