"""``ragtune bench``: comparisons side by side, in one run, on one machine.

A *section* is a function ``(BenchContext) -> Sequence[Row]``; each row is one metric measured
two ways (``ours`` and ``peer``) and their ratio. This module ships the serving sections

* ``a_stack_vs_raw`` — our stack vs a raw vLLM OpenAI server (and any ``extra_peers``, e.g.
  Ray Serve LLM), at concurrency 1/4/16;
* ``b_adapters`` — base model only vs a mix of 3 and of 8 adapters (on our stack), and the 8-adapter
  mix on ours vs on the raw vLLM peer serving the same adapters;
* ``c_rag`` — chat with RAG vs without (on our stack);

and accepts more (ingest, training) from other modules: any callable returning :class:`Row`\\ s.
Sections take URLs and model names of servers that are already running; starting them is the
caller's job (``cluster/cli.py`` injects ``start_ours(config) -> url`` and
``start_raw_vllm(model_dir) -> url``). Results: ``loadtests/results/<date>-<machine>.md`` + ``.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from loadtests.config import LoadShape, LoadTestConfig, MixEntry, PromptSpec, RagSpec
from loadtests.report import Report
from loadtests.runner import run_loadtest

__all__ = ["BenchContext", "BenchResult", "BenchTargets", "Peer", "Row", "SERVING_SECTIONS", "Section",
           "adapter_mix", "bench_markdown", "rag_vs_plain", "run_bench", "stack_vs_raw"]

logger = logging.getLogger(__name__)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Row:
    """One metric measured two ways. ``better`` says which direction wins (for the ratio's reading)."""

    section: str
    metric: str
    ours: float | None
    peer: float | None
    unit: str = ""
    better: Literal["higher", "lower"] = "higher"
    ours_label: str = "ours"
    peer_label: str = "peer"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """``ours / peer``, or ``None`` when either is missing or the peer is 0."""
        if self.ours is None or not self.peer:
            return None
        return self.ours / self.peer


@dataclass(frozen=True)
class Peer:
    """Another server section (a) compares our stack with: its label in the tables, URL, model name."""

    label: str
    url: str
    model: str


@dataclass(frozen=True)
class BenchTargets:
    """Running servers and the names to send: the section functions need nothing else."""

    ours_url: str
    ours_model: str
    peer_url: str | None = None
    peer_model: str | None = None
    adapters: tuple[str, ...] = ()
    rag_collection: str | None = None
    api_key: str | None = None
    extra_peers: tuple[Peer, ...] = ()  # more peers for section (a), after the raw vLLM one


@dataclass
class BenchContext:
    """What a section gets: the targets, the mode (``quick`` = CI-sized) and a scratch folder."""

    targets: BenchTargets
    mode: Literal["quick", "full"] = "quick"
    work_dir: Path = Path("data/bench")
    progress: bool = False
    client: str = "httpx"

    def loadtest(self, label: str, url: str, mix: Sequence[str], concurrency: int,
                 rag_fraction: float = 0.0) -> Report:
        """One concurrency step against ``url``, sized by the mode; equal weights over ``mix``."""
        quick = self.mode == "quick"
        cfg = LoadTestConfig(
            base_url=url, allow_remote=True, client=self.client, api_key=self.targets.api_key,
            mix=[MixEntry(model=m, weight=1.0) for m in mix],
            prompts=PromptSpec(input_tokens=32 if quick else 256, output_tokens=16 if quick else 64),
            rag=RagSpec(fraction=rag_fraction, collection=self.targets.rag_collection or "default"),
            shape=LoadShape(kind="concurrency", levels=[concurrency],
                            requests=max(4, 2 * concurrency) if quick else max(32, 16 * concurrency),
                            duration_s=60 if quick else 600),
            progress=self.progress, plots=False)
        return run_loadtest(cfg, self.work_dir / label)


Section = Callable[[BenchContext], Sequence[Row]]


def _rows(section: str, what: str, ours: Report, peer: Report, labels: tuple[str, str]) -> list[Row]:
    """Throughput, TTFT, TPOT (and failures, if any) of two single-step reports."""
    a, b = ours.steps[0], peer.steps[0]
    row = dict(section=section, ours_label=labels[0], peer_label=labels[1])
    out = [Row(metric=f"output tok/s {what}", ours=a.output_tokens_per_s, peer=b.output_tokens_per_s,
               unit="tok/s", **row),
           Row(metric=f"TTFT p50 {what}", ours=a.ttft_ms["p50"], peer=b.ttft_ms["p50"], unit="ms",
               better="lower", **row),
           Row(metric=f"TPOT p50 {what}", ours=a.tpot_ms["p50"], peer=b.tpot_ms["p50"], unit="ms",
               better="lower", **row)]
    if a.failed or b.failed:
        out.append(Row(metric=f"failed requests {what}", ours=a.failed, peer=b.failed, better="lower",
                       note=f"ours {a.errors or '-'}; peer {b.errors or '-'}", **row))
    return out


def stack_vs_raw(ctx: BenchContext) -> list[Row]:
    """(a) Our stack vs a raw vLLM server (and each of ``extra_peers``) on the same base model, at
    concurrency 1, 4 and 16.

    At each concurrency ours runs once, then every peer in turn; rows come grouped by peer (one
    table each), every one with the ratio ours ÷ that peer.
    """
    t = ctx.targets
    peers = [(Peer("raw vLLM", t.peer_url, t.peer_model or t.ours_model), "raw")] if t.peer_url else []
    peers += [(p, re.sub(r"[^a-z0-9]+", "-", p.label.lower()).strip("-")) for p in t.extra_peers]
    skipped = [] if t.peer_url else [Row("a_stack_vs_raw", "skipped", None, None, note="no raw vLLM peer URL given")]
    if not peers:
        return skipped
    rows: dict[str, list[Row]] = {p.label: [] for p, _ in peers}
    for c in (1, 4, 16):
        ours = ctx.loadtest(f"a-ours-c{c}", t.ours_url, [t.ours_model], c)
        for p, slug in peers:
            peer = ctx.loadtest(f"a-{slug}-c{c}", p.url, [p.model], c)
            rows[p.label] += _rows("a_stack_vs_raw", f"@c={c}", ours, peer, ("ours", p.label))
    return skipped + [row for group in rows.values() for row in group]


RAW_LORA_NOTE = ("raw vLLM's CPU LoRA ops compute the base rows of mixed batches with the wrong adapter "
                 "(DESIGN.md trap 1): its speed, not correct output")


def served_models(url: str, api_key: str | None = None) -> set[str]:
    """Model ids a server lists on ``/v1/models`` (empty if it does not answer)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        r.raise_for_status()
        return {m["id"] for m in r.json().get("data", [])}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return set()


def adapter_mix(ctx: BenchContext) -> list[Row]:
    """(b) Base model only vs an even mix of 3 and of 8 adapters, on our stack (c=4 quick, 16 full).

    When the raw vLLM peer serves the same 8 adapter names (``cluster/bench.py`` starts it with
    ``--lora-modules``), the same 8-adapter mix and base-only load also run there: rows ours vs
    raw vLLM, and the mix ÷ base ratio of each side.
    """
    t, c = ctx.targets, 4 if ctx.mode == "quick" else 16
    base = ctx.loadtest(f"b-base-c{c}", t.ours_url, [t.ours_model], c)
    rows, mixes = [], {}
    for n in (3, 8):
        if len(t.adapters) < n:
            rows.append(Row("b_adapters", f"{n} adapters", None, None,
                            note=f"skipped: needs {n} adapter names, got {len(t.adapters)}"))
            continue
        mixes[n] = ctx.loadtest(f"b-mix{n}-c{c}", t.ours_url, list(t.adapters[:n]), c)
        rows += _rows("b_adapters", f"{n} adapters @c={c}", mixes[n], base, (f"{n}-adapter mix", "base only"))
    return rows + _raw_adapter_mix(ctx, c, base, mixes.get(8))


def _raw_adapter_mix(ctx: BenchContext, c: int, base: Report, mixed: Report | None) -> list[Row]:
    """Ours vs raw vLLM with the same 8 adapters (only if the peer serves them)."""
    t = ctx.targets
    labels = dict(ours_label="ours", peer_label="raw vLLM")
    if not t.peer_url or mixed is None:
        return []
    names = list(t.adapters[:8])
    missing = [n for n in names if n not in served_models(t.peer_url, t.api_key)]
    if missing:
        return [Row("b_adapters", "8 adapters on raw vLLM", None, None, **labels,
                    note=f"skipped: the peer does not serve {missing[:3]}{'…' if len(missing) > 3 else ''}")]
    peer_base = ctx.loadtest(f"b-raw-base-c{c}", t.peer_url, [t.peer_model or t.ours_model], c)
    peer_mixed = ctx.loadtest(f"b-raw-mix8-c{c}", t.peer_url, names, c)
    rows = [dataclasses.replace(r, note=RAW_LORA_NOTE if not r.note else f"{r.note}; {RAW_LORA_NOTE}")
            for r in _rows("b_adapters", f"8-adapter mix @c={c}", mixed, peer_mixed, ("ours", "raw vLLM"))]

    def share(mix: Report, only: Report) -> float | None:
        m, b = mix.steps[0].output_tokens_per_s, only.steps[0].output_tokens_per_s
        return m / b if m is not None and b else None

    rows.append(Row("b_adapters", f"8-adapter mix ÷ base output tok/s @c={c}", share(mixed, base),
                    share(peer_mixed, peer_base), "×", **labels,
                    note=f"goal (ours) >= 0.85 in full mode; {RAW_LORA_NOTE}"))
    return rows


def rag_vs_plain(ctx: BenchContext) -> list[Row]:
    """(c) Chat with RAG on every request vs without, on our stack (c=4 quick, 16 full)."""
    t, c = ctx.targets, 4 if ctx.mode == "quick" else 16
    if not t.rag_collection:
        return [Row("c_rag", "skipped", None, None, note="no RAG collection given")]
    plain = ctx.loadtest(f"c-plain-c{c}", t.ours_url, [t.ours_model], c)
    rag = ctx.loadtest(f"c-rag-c{c}", t.ours_url, [t.ours_model], c, rag_fraction=1.0)
    return _rows("c_rag", f"@c={c}", rag, plain, ("with RAG", "without RAG"))


SERVING_SECTIONS: dict[str, Section] = {"a_stack_vs_raw": stack_vs_raw, "b_adapters": adapter_mix,
                                        "c_rag": rag_vs_plain}


@dataclass
class BenchResult:
    """All rows of a bench run and where they were written."""

    rows: list[Row]
    meta: dict
    files: dict[str, str] = field(default_factory=dict)


def _run_section(name: str, section: Section, ctx: BenchContext) -> list[Row]:
    try:
        return list(section(ctx))
    except Exception as exc:  # one broken section must not lose the others' numbers
        logger.exception("bench section %s failed", name)
        return [Row(name, "section failed", None, None, note=f"{type(exc).__name__}: {exc}"[:300])]


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def bench_markdown(result: BenchResult) -> str:
    """The results page: one table per section (metric, ours, peer, ratio)."""
    m = result.meta
    lines = [f"# ragtune bench — {m['date']} on {m['machine']}", "",
             f"Mode `{m['mode']}`; {m['cpus']} CPUs, {m['platform']}, Python {m['python']}. "
             f"Targets: ours `{m['targets']['ours_url']}` ({m['targets']['ours_model']}), "
             f"peer `{m['targets']['peer_url']}`"
             + "".join(f", {p['label']} `{p['url']}`" for p in m["targets"].get("extra_peers", ()))
             + ". Ratio = ours ÷ peer; ↑ higher is better, ↓ lower is better."]
    section, labels = None, None
    for r in result.rows:
        if r.section != section:
            section, labels = r.section, None
            lines += ["", f"## {section}"]
        if (r.ours_label, r.peer_label) != labels:  # a new table whenever the compared pair changes
            labels = (r.ours_label, r.peer_label)
            lines += ["", f"| metric | {r.ours_label} | {r.peer_label} | ratio | note |", "|---|---|---|---|---|"]
        lines.append(_row_md(r))
    return "\n".join(lines) + "\n"


def _row_md(r: Row) -> str:
    arrow = "↑" if r.better == "higher" else "↓"
    unit = f" ({r.unit})" if r.unit else ""
    ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
    return f"| {r.metric}{unit} {arrow} | {_fmt(r.ours)} | {_fmt(r.peer)} | {ratio} | {r.note} |"


def _free_name(results_dir: Path, date: str, machine: str) -> str:
    name, n = f"{date}-{machine}", 2
    while (results_dir / f"{name}.md").exists():
        name, n = f"{date}-{machine}-{n}", n + 1
    return name


def run_bench(ctx: BenchContext, sections: Mapping[str, Section] | None = None,
              results_dir: Path = RESULTS_DIR) -> BenchResult:
    """Run ``sections`` (default: the serving ones) in order; write ``<date>-<machine>.md`` + ``.json``.

    Args:
        ctx: Targets, mode, scratch folder.
        sections: Name → section callable; a section that raises becomes a "section failed" row.
        results_dir: Where the results page and its JSON go (a ``-2``… suffix avoids overwriting).

    Returns:
        The rows, the run's metadata, and the written file paths.
    """
    sections = SERVING_SECTIONS if sections is None else sections
    rows = [row for name, fn in sections.items() for row in _run_section(name, fn, ctx)]
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.node() or "machine")
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine, "mode": ctx.mode,
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "targets": {**asdict(ctx.targets), "api_key": "***" if ctx.targets.api_key else None},
            "sections": list(sections)}
    result = BenchResult(rows=rows, meta=meta)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = _free_name(results_dir, meta["date"], machine)
    md, js = results_dir / f"{name}.md", results_dir / f"{name}.json"
    md.write_text(bench_markdown(result))
    js.write_text(json.dumps({**meta, "rows": [dict(asdict(r), ratio=r.ratio) for r in rows]}, indent=1) + "\n")
    result.files = {"markdown": str(md), "json": str(js)}
    return result
