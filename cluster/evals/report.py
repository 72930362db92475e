"""Per-arm scores from the answers, a recommendation derived from them, and the report files.

Every rate is a mean of per-item 0/1 (or F1) values with its 95% bootstrap interval and ``n``.
The recommendation is computed, not written: a criterion has a clear winner only when the best
arm's interval lies above every other arm's; otherwise the report says the arms are within noise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cluster.evals.arms import Answer, ArmRun
from cluster.evals.inputs import Question
from cluster.evals.metrics import (
    Interval,
    best_f1,
    citations,
    contains_answer,
    exact_match,
    interval,
    is_refusal,
    percentile,
)

__all__ = ["CRITERIA", "arm_scores", "recommend", "write_report"]

# criterion → (metric key, higher is better, what it stands for)
CRITERIA: dict[str, tuple[str, bool, str]] = {
    "knowledge": ("accuracy", True, "answers questions about the documents"),
    "freshness": ("freshness", True, "answers with the updated fact after the store changed, no retraining"),
    "format": ("format_compliance", True, "follows the trained answer format"),
    "citations": ("citation_precision", True, "cites sources that hold the answer"),
    "refusals": ("refusal_precision", True, "declines only questions the documents cannot answer"),
    "latency": ("e2e_p50_ms", False, "end-to-end time per request (p50)"),
    "cost": ("cost_per_1k_requests", False, "cost per 1,000 requests at the measured throughput"),
}
RATES = ("accuracy", "exact_match", "f1", "citation_precision", "citation_recall", "refusal_precision",
         "refusal_recall", "format_compliance", "freshness", "context_hit", "hit_at_k", "mrr", "ndcg",
         "judge_accuracy")


def _cited_documents(answer: Answer) -> tuple[list[str | None], list[str]]:
    """(cited documents — None for a number with no source — , the documents the model was given)."""
    given = [s.get("document") for s in answer.sources]
    cited = [given[n - 1] if 1 <= n <= len(given) else None for n in citations(answer.reply)]
    return cited, given


def arm_scores(run: ArmRun, questions: Mapping[str, Question], *, style: re.Pattern | None,
               retrieval: Mapping[str, dict] | None, price_per_replica_hour: float,
               replicas: int) -> tuple[dict, dict[str, dict[str, float]]]:
    """The arm's row of the report (rates with intervals, latency, tokens, cost) and its per-item
    values, ``{metric: {item id: value}}``, which the recommendation compares arm against arm."""
    qa = [a for a in run.answers if a.phase == "qa"]
    fresh = [a for a in run.answers if a.phase == "fresh"]
    ok = [a for a in qa if a.error is None]
    answerable = [a for a in ok if questions[a.question_id].answerable]
    items: dict[str, dict[str, float]] = {k: {} for k in RATES}
    for a in answerable:
        qid, accepted = a.question_id, questions[a.question_id].answers
        items["accuracy"][qid] = contains_answer(a.reply, accepted)
        items["exact_match"][qid] = exact_match(a.reply, accepted)
        items["f1"][qid] = best_f1(a.reply, accepted)
        if a.judge is not None:
            items["judge_accuracy"][qid] = a.judge
        if run.arm.rag:
            gold = set(questions[qid].documents)
            cited, given = _cited_documents(a)
            items["context_hit"][qid] = float(bool(gold & set(given)))
            if cited:
                items["citation_precision"][qid] = sum(d in gold for d in cited) / len(cited)
            items["citation_recall"][qid] = len(gold & {d for d in cited if d}) / len(gold)
        if run.arm.rag and retrieval and qid in retrieval:
            items["hit_at_k"][qid], items["mrr"][qid] = retrieval[qid]["hit"], retrieval[qid]["rr"]
            items["ndcg"][qid] = retrieval[qid].get("ndcg")
    for a in ok:
        unanswerable = not questions[a.question_id].answerable
        if is_refusal(a.reply):
            items["refusal_precision"][a.question_id] = float(unanswerable)
        if unanswerable:
            items["refusal_recall"][a.question_id] = float(is_refusal(a.reply))
        if style is not None:
            items["format_compliance"][a.question_id] = float(bool(style.search(a.reply)))
    for a in fresh:
        if a.error is None:
            items["freshness"][a.question_id] = contains_answer(a.reply, questions[a.question_id].answers)

    timed = [a for a in ok if a.e2e_ms is not None]
    ttft = [a.ttft_ms for a in timed if a.ttft_ms is not None]
    e2e = [a.e2e_ms for a in timed]
    per_request_s = run.wall_s / max(len(run.answers), 1)
    scores: dict = {k: interval(list(v.values())).as_dict() for k, v in items.items()}
    if style is None:
        scores["format_compliance"] = {"mean": None, "ci95": [None, None], "n": 0, "note": "no --style-regex"}
    if not run.arm.rag:
        for key in ("citation_precision", "citation_recall", "context_hit", "hit_at_k", "mrr", "ndcg",
         "judge_accuracy"):
            scores[key]["note"] = "no sources given"
    scores.update({
        "n": len(qa), "n_fresh": len(fresh), "errors": sum(a.error is not None for a in run.answers),
        "model": run.arm.model, "rag": run.arm.rag,
        "citation_rate": interval([float(bool(citations(a.reply))) for a in answerable]).as_dict(),
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
        "e2e_p50_ms": percentile(e2e, 50), "e2e_p95_ms": percentile(e2e, 95),
        "prompt_tokens_mean": _mean(a.prompt_tokens for a in ok),
        "completion_tokens_mean": _mean(a.completion_tokens for a in ok),
        "requests_per_s": len(run.answers) / run.wall_s if run.wall_s else None,
        "cost_per_1k_requests": price_per_replica_hour * replicas * per_request_s * 1000 / 3600,
    })
    return scores, items


def _mean(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return sum(data) / len(data) if data else None


def _value(row: dict, metric: str) -> float | None:
    cell = row.get(metric)
    return cell.get("mean") if isinstance(cell, dict) else cell


def _ival(row: dict, metric: str) -> Interval:
    cell = row.get(metric)
    if isinstance(cell, dict):
        low, high = cell["ci95"]
        return Interval(cell["mean"], low, high, cell["n"])
    return Interval(cell, cell, cell, 1 if cell is not None else 0)


def _paired(items: Mapping[str, Mapping[str, Mapping[str, float]]], a: str, b: str, metric: str) -> Interval:
    """Interval of ``a − b`` over the items both arms answered (the same questions: a paired test)."""
    xa, xb = items[a].get(metric, {}), items[b].get(metric, {})
    return interval([xa[k] - xb[k] for k in xa.keys() & xb.keys()])


def _winner(arms: Mapping[str, dict], items, metric: str, higher: bool) -> dict | None:
    ranked = sorted(((name, _value(row, metric)) for name, row in arms.items() if _value(row, metric) is not None),
                    key=lambda kv: kv[1], reverse=higher)
    if not ranked:
        return None
    best, top = ranked[0]
    if metric in ("e2e_p50_ms", "cost_per_1k_requests"):  # one number per arm: within 5% is a tie
        ties = [name for name, value in ranked[1:] if abs(value - top) <= 0.05 * abs(top)]
    else:  # a tie unless the paired difference's interval excludes zero
        ties = [name for name, _ in ranked[1:] if (d := _paired(items, best, name, metric)).low is None or d.low <= 0]
    return {"metric": metric, "best": best, "value": top, "tied_with": ties, "ranking": [n for n, _ in ranked]}


def _best_of(arms: Mapping[str, dict], names: Sequence[str], metric: str) -> str | None:
    present = [n for n in names if n in arms and _value(arms[n], metric) is not None]
    return max(present, key=lambda n: _value(arms[n], metric)) if present else None


def _above(arms: Mapping[str, dict], items, metric: str, group: Sequence[str],
           others: Sequence[str]) -> tuple[bool, str]:
    """Whether the best arm of ``group`` beats the best of ``others`` on ``metric`` (paired interval > 0)."""
    a, b = _best_of(arms, group, metric), _best_of(arms, others, metric)
    if a is None or b is None:
        return False, ""
    diff = _paired(items, a, b, metric)
    clear = diff.low is not None and diff.low > 0
    gap = (f"{diff.mean * 100:+.0f} points [{diff.low * 100:+.0f}, {diff.high * 100:+.0f}], paired n={diff.n}"
           if diff.mean is not None else "no common items")
    return clear, f"{a} {_pct(_ival(arms[a], metric))} vs {b} {_pct(_ival(arms[b], metric))} ({gap})"


def _pct(iv: Interval) -> str:
    if iv.mean is None:
        return "n/a"
    return f"{iv.mean:.0%} [{iv.low:.0%}–{iv.high:.0%}] (n={iv.n})"


def recommend(arms: Mapping[str, dict], items: Mapping[str, Mapping[str, Mapping[str, float]]],
              skipped: Mapping[str, str]) -> dict:
    """Which arm wins each criterion, and the decision those wins support (None if none).

    A gain counts when the paired bootstrap interval of the difference (the same questions asked
    of both arms) lies above zero; otherwise the report says the arms are within noise at this n.
    """
    winners = {c: _winner(arms, items, metric, higher) for c, (metric, higher, _) in CRITERIA.items()}
    rag_arms, plain = [n for n in arms if arms[n]["rag"]], [n for n in arms if not arms[n]["rag"]]
    ft_arms, no_ft = [n for n in arms if n.startswith("ft")], [n for n in arms if not n.startswith("ft")]
    lines: list[str] = []
    knowledge, how = _above(arms, items, "accuracy", rag_arms, plain)
    fresh, fresh_how = _above(arms, items, "freshness", rag_arms, plain)
    behaviour, fmt_how = _above(arms, items, "format_compliance", ft_arms, no_ft)
    if how:
        lines.append(f"Knowledge: {how} — " + ("retrieval carries the facts." if knowledge
                                               else "no measurable difference at this n."))
    if fresh_how:
        lines.append(f"Freshness: {fresh_how} — " + ("retrieval follows updated documents without retraining."
                                                      if fresh else "no measurable difference at this n."))
    if fmt_how:
        lines.append(f"Format: {fmt_how} — " + ("fine-tuning teaches the behaviour." if behaviour
                                                 else "no measurable difference at this n."))
    needs_rag, needs_ft = knowledge or fresh, behaviour
    decision = None
    if needs_rag and needs_ft:
        if "ft+rag" in arms:
            worse = [m for m in ("accuracy", "freshness", "format_compliance")
                     if (w := _best_of(arms, list(arms), m)) and w != "ft+rag"
                     and (d := _paired(items, w, "ft+rag", m)).low is not None and d.low > 0]
            decision = "ft+rag"
            lines.append("Decision: combine (ft+rag) — knowledge needs retrieval and the format needs the adapter"
                         + (f"; but ft+rag is measurably behind the best arm on {', '.join(worse)}." if worse else
                            ", and ft+rag is within noise of the best arm on each."))
        else:
            decision = _best_of(arms, rag_arms, "accuracy")
            lines.append("Decision: both help, but ft+rag was not measured (" + skipped.get("ft+rag", "not asked")
                         + f"); best measured: {decision}.")
    elif needs_rag:
        decision = _best_of(arms, [n for n in rag_arms if n == "rag"] or rag_arms, "accuracy")
        lines.append(f"Decision: retrieval ({decision}) — the gain is knowledge; fine-tuning showed no "
                     "measurable format gain" + ("" if ft_arms else " (no ft arm ran)") + ".")
    elif needs_ft:
        decision = _best_of(arms, ft_arms, "format_compliance")
        lines.append(f"Decision: fine-tuning ({decision}) — the gain is behaviour; retrieval showed no "
                     "measurable knowledge gain" + ("" if rag_arms else " (no rag arm ran)") + ".")
    else:
        lines.append("Decision: none — no arm is measurably better than the others at this n; add questions.")
    for criterion, (_, _, meaning) in CRITERIA.items():
        w = winners[criterion]
        if w and criterion in ("latency", "cost"):
            lines.append(f"{criterion.capitalize()}: {w['best']} is lowest ({meaning})"
                         + (f"; within 5% of {', '.join(w['tied_with'])}." if w["tied_with"] else "."))
    return {"decision": decision, "winners": winners, "lines": lines}


def _cell(row: dict, key: str) -> str:
    cell = row.get(key)
    if isinstance(cell, dict):
        if cell["mean"] is None:
            return "—"
        low, high = cell["ci95"]
        return f"{cell['mean']:.0%} [{low:.0%}–{high:.0%}] n={cell['n']}"
    if cell is None:
        return "—"
    if key.endswith("_ms"):
        return f"{cell:,.0f}"
    return f"{cell:.4f}" if key.startswith("cost") else f"{cell:,.1f}" if isinstance(cell, float) else str(cell)


COLUMNS = [("accuracy", "accuracy"), ("judge_accuracy", "judge"), ("f1", "token F1"), ("freshness", "freshness"),
           ("format_compliance", "format"), ("citation_precision", "citation prec."),
           ("refusal_precision", "refusal prec."), ("refusal_recall", "refusal recall"),
           ("hit_at_k", "hit@k"), ("mrr", "MRR"), ("ttft_p50_ms", "TTFT p50 ms"), ("e2e_p50_ms", "e2e p50 ms"),
           ("e2e_p95_ms", "e2e p95 ms"), ("prompt_tokens_mean", "prompt tok"), ("cost_per_1k_requests", "$/1k req")]


def markdown(report: dict) -> str:
    """The decision table and the recommendation as Markdown."""
    judged = any(_value(row, "judge_accuracy") is not None for row in report["arms"].values())
    columns = [c for c in COLUMNS if judged or c[0] != "judge_accuracy"]  # the judge column only when asked
    out = ["# ragtune eval", "", f"Endpoint `{report['settings']['url']}`, base model "
           f"`{report['settings']['base_model']}`, adapter `{report['settings'].get('adapter') or '—'}`, "
           f"collection `{report['settings']['collection']}`, {report['settings']['concurrency']} requests at a time, "
           f"max_tokens {report['settings']['max_tokens']}, temperature 0.", "",
           "| arm | " + " | ".join(title for _, title in columns) + " |",
           "|---|" + "---|" * len(columns)]
    for name, row in report["arms"].items():
        out.append(f"| {name} | " + " | ".join(_cell(row, key) for key, _ in columns) + " |")
    if report["skipped"]:
        out += ["", "Skipped arms:"] + [f"- {arm}: {why}" for arm, why in report["skipped"].items()]
    out += ["", "## Recommendation", ""] + [f"- {line}" for line in report["recommendation"]["lines"]]
    out += ["", "Rates are means with 95% bootstrap intervals; accuracy = a normalised accepted answer "
            "appears in the reply (answerable questions); freshness = the same, for questions about "
            "documents updated after training; latency from the same streamed requests; cost = "
            f"${report['settings']['price_per_replica_hour']}/replica-hour × {report['settings']['replicas']} "
            "replica(s) at the measured throughput.", ""]
    return "\n".join(out)


def chart(report: dict, path: Path) -> None:
    """Per-arm bars with 95% intervals for the rates a decision rests on, plus latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Rates a person decides on; the citation and refusal panels show how often the behaviour happens
    # at all (precision is n/a for an arm that never cites or never refuses; report.json has both).
    panels = [("accuracy", "accuracy (answerable)"), ("freshness", "freshness (after updates)"),
              ("format_compliance", "format compliance"), ("citation_rate", "answers citing a source [n]"),
              ("refusal_recall", "unanswerable questions refused")]
    names = list(report["arms"])
    colours = [{"base": "#9e9e9e", "rag": "#1f77b4", "ft": "#ff7f0e", "ft+rag": "#2ca02c"}.get(n, "#8c564b")
               for n in names]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        means, errs = [], [[], []]
        for name in names:
            iv = _ival(report["arms"][name], key)
            mean = iv.mean if iv.mean is not None else 0.0
            means.append(mean)
            errs[0].append(mean - iv.low if iv.low is not None else 0)
            errs[1].append(iv.high - mean if iv.high is not None else 0)
        ax.bar(names, means, yerr=errs, capsize=4, color=colours)
        ax.set_title(title)
        ax.set_ylim(0, 1.05)
        for i, name in enumerate(names):
            value = _value(report["arms"][name], key)
            ax.text(i, means[i] + 0.02, "n/a" if value is None else f"{value:.0%}", ha="center", fontsize=8)
    ax = axes.flat[-1]  # latency: TTFT and end-to-end p50 side by side, from the same requests
    x = range(len(names))
    ttft = [report["arms"][n].get("ttft_p50_ms") or 0 for n in names]
    e2e = [report["arms"][n].get("e2e_p50_ms") or 0 for n in names]
    ax.bar([i - 0.2 for i in x], ttft, width=0.4, color=colours, alpha=0.5, label="TTFT p50")
    ax.bar([i + 0.2 for i in x], e2e, width=0.4, color=colours, label="end-to-end p50")
    ax.set_xticks(list(x), names)
    ax.set_title("latency (ms)")
    ax.legend(fontsize=8)
    decision = report["recommendation"]["decision"]
    fig.suptitle(f"ragtune eval — decision: {decision or 'none (within noise)'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, report: dict, answers: Sequence[Answer], questions: Mapping[str, Question]) -> None:
    """report.json, report.md, report.png and answers.jsonl (one line per request) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    chart(report, out / "report.png")
    with open(out / "answers.jsonl", "w") as f:
        for a in answers:
            q = questions[a.question_id]
            row = {**a.as_dict(), "question": q.question, "accepted": list(q.answers), "gold": list(q.documents),
                   "correct": contains_answer(a.reply, q.answers) if q.answers else None,
                   "refused": is_refusal(a.reply), "cited": citations(a.reply)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
