"""Retrieval quality on a labelled set: hit@k, MRR@k and nDCG@k, computed by ranx.

The input is what a retriever returns and what a labeller marked, as plain dicts::

    from retrieval.quality import retrieval_metrics
    run = {"q1": ["doc-a", "doc-b"], "q2": ["doc-c"]}          # ranked ids, best first
    qrels = {"q1": {"doc-b"}, "q2": {"doc-c", "doc-d"}}        # relevant ids per question
    retrieval_metrics(run, qrels, k=5)
    # {'hit@5': 1.0, 'mrr@5': 0.75, 'ndcg@5': 0.80..., 'queries': 2, 'k': 5}

Ids are whatever the labels use: chunk ids, document ids (``Chunk.document``) or sources. Every
labelled question counts: one missing from ``run`` (or with nothing retrieved) scores 0. A
question with no relevant id (one that should be abstained on) has no rank to measure: it is left
out and counted in ``no_relevant``. Binary relevance. ranx compiles its metrics with numba: the first call in a fresh environment takes
tens of seconds (cached on disk after), later calls milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["METRICS", "retrieval_metrics"]

# Our names → ranx's metric names.
METRICS = {"hit": "hit_rate", "mrr": "mrr", "ndcg": "ndcg"}
# ranx needs at least one retrieved item per question; this id is never relevant.
_NOTHING = "\x00nothing-retrieved"


def retrieval_metrics(
    run: Mapping[str, Sequence[str]], qrels: Mapping[str, Iterable[str]], k: int = 5, *, per_question: bool = False
) -> dict[str, float | int]:
    """hit@k, MRR@k and nDCG@k averaged over the labelled questions.

    Args:
        run: Question id → retrieved ids, best first (duplicates after the first are ignored).
        qrels: Question id → the ids relevant to it (questions with none are left out, counted).
        k: Cut-off rank.
        per_question: Also return each question's scores (``ragtune eval`` compares arms per question).

    Returns:
        ``{"hit@k", "mrr@k", "ndcg@k"}`` in [0, 1], plus ``queries`` (labelled questions) and ``k``;
        with ``per_question``, ``"per_question": {qid: {"hit@k", "mrr@k", "ndcg@k"}}`` too.

    Raises:
        ValueError: ``k < 1``, no labelled question, a question without relevant ids, or run
            entries for questions that have no labels (the message names them).
    """
    from ranx import Qrels, Run, evaluate

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    labels, no_relevant = _labels(qrels)
    unlabelled = sorted(set(run) - set(labels) - no_relevant)
    if unlabelled:
        raise ValueError(f"run has questions without labels in qrels: {unlabelled[:5]}")
    scored = {qid: _scores(run.get(qid, ()), qid) for qid in labels}
    names = [f"{METRICS[name]}@{k}" for name in METRICS]
    ranx_run = Run(scored)
    values = evaluate(Qrels({q: dict.fromkeys(ids, 1) for q, ids in labels.items()}), ranx_run, names)
    result: dict = {f"{name}@{k}": float(values[f"{METRICS[name]}@{k}"]) for name in METRICS}
    result.update(queries=len(labels), no_relevant=len(no_relevant), k=k)
    if per_question:  # ranx keeps each query's score on the Run it evaluated
        result["per_question"] = {qid: {f"{name}@{k}": float(ranx_run.scores[f"{METRICS[name]}@{k}"][qid])
                                        for name in METRICS} for qid in labels}
    return result


def _labels(qrels: Mapping[str, Iterable[str]]) -> tuple[dict[str, set[str]], set[str]]:
    labels, no_relevant = {}, set()
    for qid, ids in qrels.items():
        relevant = {ids} if isinstance(ids, str) else set(ids)
        if relevant:
            labels[str(qid)] = {str(i) for i in relevant}
        else:
            no_relevant.add(str(qid))
    if not labels:
        raise ValueError(f"no question with a relevant id in qrels ({len(no_relevant)} without): nothing to measure")
    return labels, no_relevant


def _scores(ranked: Sequence[str], qid: str) -> dict[str, float]:
    """Ranked ids as ranx scores (higher = better): n, n-1, … for ranks 1, 2, …"""
    if isinstance(ranked, str):
        raise ValueError(f"run[{qid!r}] must be a list of ids, got a string")
    order = list(dict.fromkeys(str(i) for i in ranked))
    if not order:
        return {_NOTHING: 1.0}
    return {doc: float(len(order) - rank) for rank, doc in enumerate(order)}
