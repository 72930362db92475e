"""Deterministic answer, citation and refusal scores, and bootstrap intervals.

Answer scores follow the SQuAD v1.1 evaluation script (normalise: lower-case, drop punctuation
and the articles a/an/the, collapse whitespace; exact match; token F1), re-stated here because
that script is not a package. "Contains" — a normalised accepted answer appears in the normalised
reply — is the headline accuracy for generated answers, which are sentences, not spans.
Intervals come from ``scipy.stats.bootstrap`` (percentile method, fixed seed).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interval",
    "best_f1",
    "citations",
    "contains_answer",
    "exact_match",
    "interval",
    "is_refusal",
    "normalise",
    "percentile",
    "token_f1",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
# [1], [2, 3], [1][3]: the markers the RAG prompt asks for ("Cite sources by their number like [1]").
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
# Phrases small and large chat models use to decline; matched on the normalised reply.
_REFUSALS = (
    "i dont know", "i do not know", "i am not sure", "im not sure", "i cannot find", "i cant find",
    "i could not find", "i couldnt find", "not mentioned", "no information", "not provided",
    "does not mention", "doesnt mention", "do not mention", "dont mention", "not specified",
    "does not say", "doesnt say", "do not have information", "dont have information",
    "do not have any information", "dont have any information", "not enough information",
    "cannot answer", "cant answer", "unable to answer", "unable to find", "not in the documents",
    "not available", "no mention", "unknown",
)


def normalise(text: str) -> str:
    """SQuAD normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(reply: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised reply equals a normalised accepted answer."""
    norm = normalise(reply)
    return float(any(norm == normalise(a) for a in answers))


def token_f1(reply: str, answer: str) -> float:
    """SQuAD token F1 between one reply and one accepted answer."""
    pred, gold = normalise(reply).split(), normalise(answer).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if not pred or not gold:
        return float(pred == gold)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_f1(reply: str, answers: Sequence[str]) -> float:
    """The best token F1 over the accepted answers (0.0 when there are none)."""
    return max((token_f1(reply, a) for a in answers), default=0.0)


def contains_answer(reply: str, answers: Sequence[str]) -> float:
    """1.0 if a normalised accepted answer appears, on word boundaries, in the normalised reply."""
    norm = f" {normalise(reply)} "
    return float(any(normalise(a) and f" {normalise(a)} " in norm for a in answers))


def citations(reply: str) -> list[int]:
    """The 1-based source numbers a reply cites, in first-use order. Numbers with no source behind
    them are kept: they count against precision (a citation of nothing is a wrong citation)."""
    seen: list[int] = []
    for group in _CITATION.findall(reply):
        for part in group.split(","):
            number = int(part)
            if number not in seen:
                seen.append(number)
    return seen


def is_refusal(reply: str) -> bool:
    """Whether a reply declines to answer (a normalised refusal phrase appears in it)."""
    norm = f" {normalise(reply)} "
    return any(f" {phrase} " in norm for phrase in _REFUSALS)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) or None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% bootstrap interval over ``n`` per-item values."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n}

    def overlaps(self, other: Interval) -> bool:
        """Whether the two intervals overlap (an unmeasured one overlaps everything)."""
        if None in (self.low, self.high, other.low, other.high):
            return True
        return not (self.high < other.low or other.high < self.low)


def interval(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean and 95% percentile-bootstrap interval of per-item values (None when there are none)."""
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if data.size == 0:
        return Interval(None, None, None, 0)
    mean = float(data.mean())
    if data.size == 1 or np.all(data == data[0]):
        return Interval(mean, mean, mean, int(data.size))  # no spread to resample
    from scipy.stats import bootstrap

    result = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=resamples, method="percentile",
                       random_state=np.random.default_rng(seed))
    ci = result.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), int(data.size))
