"""`ragtune eval` scores against hand-computed cases."""

from __future__ import annotations

import pytest

from cluster.evals.metrics import (
    best_f1,
    citations,
    contains_answer,
    exact_match,
    interval,
    is_refusal,
    normalise,
    percentile,
    token_f1,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("The Cat sat.", "cat sat"),
    ("  An   apple, a PEAR!  ", "apple pear"),
    ("theatre is not an article", "theatre is not article"),
    ("", ""),
])
def test_normalise_is_squad(text, expected):
    assert normalise(text) == expected


def test_exact_match_after_normalisation():
    assert exact_match("The Oriel.", ["oriel"]) == 1.0
    assert exact_match("It is the Oriel", ["Oriel"]) == 0.0


def test_token_f1_by_hand():
    # pred tokens: [ilse, varga, is, harbourmaster]; gold: [ilse, varga] → P = 2/4, R = 2/2, F1 = 2/3
    assert token_f1("Ilse Varga is the harbourmaster", "Ilse Varga") == pytest.approx(2 / 3)
    assert token_f1("nothing shared", "Ilse Varga") == 0.0
    assert token_f1("", "") == 1.0
    assert best_f1("Ilse Varga", ["Agnes Brull", "Ilse Varga"]) == 1.0
    assert best_f1("anything", []) == 0.0


def test_contains_answer_on_word_boundaries():
    assert contains_answer("A single crossing costs 7 krona.", ["7 krona"]) == 1.0
    assert contains_answer("It costs 17 krona.", ["7 krona"]) == 0.0  # not a substring match inside "17"
    assert contains_answer("The Ice Shuttle replaces it.", ["Ice Shuttle", "bus"]) == 1.0
    assert contains_answer("no idea", ["Ice Shuttle"]) == 0.0


def test_citations_parse_groups_in_first_use_order():
    assert citations("See [2] and [1, 3]; also [2][4].") == [2, 1, 3, 4]
    assert citations("No markers, [x] or [ ] here.") == []


@pytest.mark.parametrize(("reply", "refused"), [
    ("I don't know.", True),
    ("The documents do not mention the revenue.", True),
    ("There is no information about that.", True),
    ("The Marrowgale carries 140 passengers.", False),
    ("I know: it is 140.", False),
])
def test_refusal_detection(reply, refused):
    assert is_refusal(reply) is refused


def test_interval_contains_mean_and_is_deterministic():
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    first, second = interval(values), interval(values)
    assert first == second
    assert first.mean == pytest.approx(0.7) and first.n == 10
    assert 0.3 <= first.low < 0.7 < first.high <= 1.0


def test_interval_degenerate_and_empty():
    assert interval([1, 1, 1]).as_dict() == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 3}
    assert interval([]).as_dict() == {"mean": None, "ci95": [None, None], "n": 0}


def test_interval_overlap():
    assert not interval([1] * 10).overlaps(interval([0] * 10))
    assert interval([1, 0] * 5).overlaps(interval([1, 1, 0] * 3))


def test_percentile():
    assert percentile([10, 20, 30, 40], 50) == 25
    assert percentile([], 50) is None
