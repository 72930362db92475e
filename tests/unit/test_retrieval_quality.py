"""retrieval.quality: hit@k, MRR, nDCG through ranx, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from retrieval.quality import retrieval_metrics


def test_known_values():
    run = {"q1": ["a", "b", "c"], "q2": ["x", "y", "z"], "q3": ["m", "n"]}
    qrels = {"q1": {"a"}, "q2": {"y"}, "q3": {"zz"}}
    m = retrieval_metrics(run, qrels, k=3)
    assert m["queries"] == 3 and m["k"] == 3
    assert m["hit@3"] == pytest.approx(2 / 3)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 0) / 3)


def test_cutoff_and_missing_or_empty_questions_count_as_misses():
    run = {"q1": ["a", "b", "c", "hit"], "q2": []}
    qrels = {"q1": {"hit"}, "q2": {"x"}, "q3": ["y"]}
    assert retrieval_metrics(run, qrels, k=3)["hit@3"] == 0.0
    m = retrieval_metrics(run, qrels, k=4)
    assert m["hit@4"] == pytest.approx(1 / 3) and m["mrr@4"] == pytest.approx(0.25 / 3)


def test_questions_without_relevant_ids_are_left_out_and_counted():
    m = retrieval_metrics({"q": ["a"], "abstain": ["b"]}, {"q": {"a"}, "abstain": set()}, k=3)
    assert (m["hit@3"], m["queries"], m["no_relevant"]) == (1.0, 1, 1)


def test_duplicates_keep_first_rank_and_several_relevant():
    m = retrieval_metrics({"q": ["a", "a", "b"]}, {"q": {"b", "c"}}, k=2)
    assert m["mrr@2"] == pytest.approx(1 / 2)  # "b" is second once the repeated "a" is dropped
    ideal = 1 + 1 / math.log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / ideal)


@pytest.mark.parametrize(
    ("run", "qrels", "k", "message"),
    [
        ({}, {}, 5, "no question with a relevant id"),
        ({"q": ["a"]}, {"q": set()}, 5, "no question with a relevant id in qrels \\(1 without\\)"),
        ({"q": ["a"], "other": ["b"]}, {"q": {"a"}}, 5, "without labels in qrels: \\['other'\\]"),
        ({"q": "abc"}, {"q": {"a"}}, 5, "must be a list of ids"),
        ({"q": ["a"]}, {"q": {"a"}}, 0, "k must be a positive integer"),
    ],
)
def test_bad_input_names_the_problem(run, qrels, k, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(run, qrels, k=k)


def test_per_question_scores_average_to_the_means():
    run = {"q1": ["a", "b"], "q2": ["c"], "q3": ["x"]}
    qrels = {"q1": {"b"}, "q2": {"c", "d"}, "q3": {"y"}}
    result = retrieval_metrics(run, qrels, k=5, per_question=True)
    per = result["per_question"]
    assert per["q1"]["mrr@5"] == 0.5 and per["q2"]["mrr@5"] == 1.0 and per["q3"]["hit@5"] == 0.0
    for name in ("hit@5", "mrr@5", "ndcg@5"):
        assert sum(p[name] for p in per.values()) / 3 == pytest.approx(result[name])
