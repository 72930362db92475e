"""`ragtune eval` aggregation and the recommendation derived from the numbers (no server)."""

from __future__ import annotations

import json
import re

import pytest

from cluster.evals.arms import Answer, Arm, ArmRun
from cluster.evals.inputs import Question
from cluster.evals.report import arm_scores, recommend, write_report

QUESTIONS = {
    "q1": Question("q1", "Fare?", ("7 krona",), ("fares.md",)),
    "q2": Question("q2", "Boat?", ("Oriel",), ("fleet.md",)),
    "none": Question("none", "Revenue?", (), ()),
    "fresh": Question("fresh", "Fare now?", ("9 krona",), ("fares.md",), update="fares.md"),
}
SOURCES = [{"document": "fares.md"}, {"document": "fleet.md"}]
STYLE = re.compile(r"^\[ragtune\]", re.MULTILINE)


def _run(arm: Arm, replies: dict[str, str], *, sources=SOURCES, wall_s=4.0) -> ArmRun:
    answers = [Answer(arm.name, qid, reply, list(sources) if arm.rag else [], ttft_ms=100.0 * (i + 1),
                      e2e_ms=1000.0 * (i + 1), prompt_tokens=50, completion_tokens=10,
                      phase="fresh" if qid == "fresh" else "qa")
               for i, (qid, reply) in enumerate(replies.items())]
    return ArmRun(arm, answers, wall_s)


def _scores(run: ArmRun, retrieval=None) -> dict:
    row, _ = arm_scores(run, QUESTIONS, style=STYLE, retrieval=retrieval, price_per_replica_hour=3.6, replicas=1)
    return row


def test_rag_arm_scores_by_hand():
    run = _run(Arm("rag", "base", True), {
        "q1": "[ragtune] It costs 7 krona [1].",       # correct, cites the gold document
        "q2": "It is the Brisket [1][3].",               # wrong; cites a non-gold doc and a missing number
        "none": "I don't know.",                        # correct refusal
        "fresh": "[ragtune] Now 9 krona [1].",           # fresh fact
    })
    retrieval = {"q1": {"hit": 1.0, "rr": 1.0}, "q2": {"hit": 1.0, "rr": 0.5}}
    s = _scores(run, retrieval)
    assert s["accuracy"]["mean"] == 0.5 and s["accuracy"]["n"] == 2
    # q1: 1 of 1 cited is gold → 1.0; q2: [1]=fares.md (not gold), [3] = no source → 0/2 → mean 0.5
    assert s["citation_precision"]["mean"] == 0.5
    assert s["citation_recall"]["mean"] == 0.5  # q1 cites its gold doc, q2 does not
    assert s["refusal_precision"] == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 1}
    assert s["refusal_recall"]["mean"] == 1.0
    assert s["format_compliance"]["mean"] == pytest.approx(1 / 3)  # qa phase only: q1 of q1, q2, none
    assert s["freshness"] == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 1}
    assert s["hit_at_k"]["mean"] == 1.0 and s["mrr"]["mean"] == 0.75
    assert s["context_hit"]["mean"] == 1.0
    assert s["n"] == 3 and s["n_fresh"] == 1
    assert s["ttft_p50_ms"] == 200.0 and s["e2e_p50_ms"] == 2000.0
    # 4 requests in 4 s → 1 s each; $3.6/h = $0.001/s → $1 per 1,000 requests
    assert s["cost_per_1k_requests"] == pytest.approx(1.0)


def test_plain_arm_has_no_citation_scores_and_errors_are_counted():
    run = _run(Arm("base", "base", False), {"q1": "Maybe 5 krona.", "q2": "The Oriel.", "none": "It is 3 million."})
    run.answers[0].error = "500: boom"
    s = _scores(run)
    assert s["errors"] == 1 and s["accuracy"]["n"] == 1 and s["accuracy"]["mean"] == 1.0
    assert s["citation_precision"]["mean"] is None and s["citation_precision"]["note"] == "no sources given"
    assert s["refusal_precision"]["n"] == 0 and s["refusal_recall"]["mean"] == 0.0


def _arms(spec: dict[str, tuple[bool, float, float, float]], n: int = 40, e2e: dict | None = None):
    """Synthetic arms: name → (rag, accuracy, format, freshness); item i is right when i < rate × n,
    so the same questions are right across arms (what a paired comparison sees)."""
    from cluster.evals.metrics import interval

    rows, items = {}, {}
    for name, (rag, *rates) in spec.items():
        per = {m: {f"q{i}": float(i < round(r * n)) for i in range(n)}
               for m, r in zip(("accuracy", "format_compliance", "freshness"), rates, strict=True)}
        rows[name] = {"rag": rag, **{m: interval(list(v.values())).as_dict() for m, v in per.items()},
                      "e2e_p50_ms": (e2e or {}).get(name, 1000.0), "cost_per_1k_requests": 0.3}
        items[name] = per
    return rows, items


def test_recommendation_follows_the_numbers():
    arms, items = _arms({"base": (False, 0.05, 0.0, 0.0), "rag": (True, 0.7, 0.0, 0.8),
                         "ft": (False, 0.05, 0.95, 0.0), "ft+rag": (True, 0.65, 0.9, 0.75)},
                        e2e={"rag": 1500.0, "ft+rag": 1600.0})
    rec = recommend(arms, items, {})
    assert rec["decision"] == "ft+rag"
    assert rec["winners"]["knowledge"]["best"] == "rag" and "ft+rag" in rec["winners"]["knowledge"]["tied_with"]
    assert "base" not in rec["winners"]["knowledge"]["tied_with"]
    assert rec["winners"]["format"]["best"] == "ft" and rec["winners"]["latency"]["best"] in ("base", "ft")
    knowledge = next(line for line in rec["lines"] if line.startswith("Knowledge:"))
    # rag is right on q0..q27, base on q0..q1: the paired difference is +65 points
    assert "rag 70%" in knowledge and "+65 points" in knowledge and "retrieval carries the facts" in knowledge


def test_recommendation_without_a_format_gain_is_retrieval():
    arms, items = _arms({"base": (False, 0.05, 0.0, 0.0), "rag": (True, 0.7, 0.0, 0.8),
                         "ft": (False, 0.05, 0.02, 0.0), "ft+rag": (True, 0.7, 0.02, 0.8)})
    assert recommend(arms, items, {})["decision"] == "rag"


def test_recommendation_within_noise_is_none():
    arms, items = _arms({"base": (False, 0.5, 0.5, 0.5), "rag": (True, 0.67, 0.5, 0.5)}, n=6)
    rec = recommend(arms, items, {"ft": "no adapter"})
    assert rec["decision"] is None and "no measurable difference" in rec["lines"][0]


def test_paired_comparison_sees_what_overlapping_intervals_hide():
    """40% vs 15% on the same 20 questions, rag right wherever base is: intervals overlap, the pair does not."""
    arms, items = _arms({"base": (False, 0.15, 0.0, 0.0), "rag": (True, 0.4, 0.0, 0.0)}, n=20)
    from cluster.evals.report import _ival

    assert _ival(arms["rag"], "accuracy").overlaps(_ival(arms["base"], "accuracy"))
    assert recommend(arms, items, {})["decision"] == "rag"


def test_report_files(tmp_path):
    runs = [_run(Arm("base", "m", False), {"q1": "7 krona", "q2": "x", "none": "I don't know"}),
            _run(Arm("rag", "m", True), {"q1": "7 krona [1]", "q2": "Oriel [2]", "none": "I don't know"})]
    scored = {r.arm.name: arm_scores(r, QUESTIONS, style=STYLE, retrieval=None, price_per_replica_hour=1.0,
                                     replicas=1) for r in runs}
    arms, items = {k: v[0] for k, v in scored.items()}, {k: v[1] for k, v in scored.items()}
    report = {"arms": arms, "skipped": {"ft": "no adapter"}, "recommendation": recommend(arms, items, {"ft": "no adapter"}),
              "settings": {"url": "http://x", "base_model": "m", "collection": "c", "concurrency": 1,
                           "max_tokens": 8, "price_per_replica_hour": 1.0, "replicas": 1}}
    write_report(tmp_path, report, [a for r in runs for a in r.answers], QUESTIONS)
    assert json.loads((tmp_path / "report.json").read_text())["arms"]["rag"]["accuracy"]["mean"] == 1.0
    md = (tmp_path / "report.md").read_text()
    assert "| rag | 100% [100%–100%] n=2" in md and "- ft: no adapter" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and lines[4]["cited"] == [2] and lines[2]["refused"] is True


class _FakeCompletions:
    """The slice of ``openai.AsyncOpenAI().chat.completions`` the judge uses, replying from a script."""

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    async def create(self, *, model, messages, temperature, max_tokens):
        from types import SimpleNamespace

        self.prompts.append(messages[0]["content"])
        text = self.replies.pop(0)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=text))])


def test_judge_verdicts_and_column():
    import asyncio
    from types import SimpleNamespace

    from cluster.evals.arms import Judge

    completions = _FakeCompletions(["Yes.", "no", "Maybe so"])
    judge = Judge(SimpleNamespace(chat=SimpleNamespace(completions=completions)), "judge-model")
    answers = [Answer("rag", "q1", "7 krona"), Answer("rag", "q2", "Brisket"), Answer("rag", "fresh", "9?", phase="fresh"),
               Answer("rag", "none", "I don't know")]  # no accepted answers: not sent to the judge
    verdicts = asyncio.run(judge.grade_all(answers, QUESTIONS))
    assert verdicts == {("rag", "q1", "qa"): 1.0, ("rag", "q2", "qa"): 0.0, ("rag", "fresh", "fresh"): None}
    assert "Accepted answers: 7 krona" in completions.prompts[0] and "Reply to grade: 7 krona" in completions.prompts[0]
    for a in answers:
        a.judge = verdicts.get((a.arm, a.question_id, a.phase))
    row, _ = arm_scores(ArmRun(Arm("rag", "m", True), answers, 1.0), QUESTIONS, style=None, retrieval=None,
                        price_per_replica_hour=1.0, replicas=1)
    assert row["judge_accuracy"] == {"mean": 0.5, "ci95": [0.0, 1.0], "n": 2}
