"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners import metrics as M


def test_rouge_l_and_exact_match_through_evaluate() -> None:
    s = M.text_scores(
        ["the cat sat on the mat", "Paris.", "", "blue sky"],
        ["the cat sat", "paris", "anything", "green grass"],
    )
    # LCS("the cat sat on the mat", "the cat sat") = 3 tokens: P = 3/6, R = 3/3, F = 2/3
    assert s.rouge_l[0] == pytest.approx(2 / 3)
    assert s.rouge_l[1] == pytest.approx(1.0)
    assert s.rouge_l[2] == 0.0 and s.rouge_l[3] == 0.0
    # exact match normalizes case, punctuation and spaces
    assert s.exact_match == [0.0, 1.0, 0.0, 0.0]


def test_text_scores_checks_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        M.text_scores(["a", "b"], ["a"])
    assert M.text_scores([], []) == M.TextScores([], [])


def test_mean_nll() -> None:
    assert M.mean_nll([-1.0, -2.0, -3.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        M.mean_nll([])


def test_paired_bootstrap_constant_shift_is_exact() -> None:
    a = [0.1, 0.5, 0.9, 0.3]
    b = [x + 0.25 for x in a]
    iv = M.paired_bootstrap(a, b, resamples=500, seed=1)
    assert iv.delta == pytest.approx(0.25)
    assert iv.low == pytest.approx(0.25) and iv.high == pytest.approx(0.25)
    assert iv.n == 4 and iv.confidence == 0.9


def test_paired_bootstrap_is_wide_for_noise_and_seeded() -> None:
    a = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    b = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    iv = M.paired_bootstrap(a, b, seed=3)
    assert iv.delta == pytest.approx(0.0)
    assert iv.low < 0.0 < iv.high  # a zero mean difference is not significant either way
    assert iv == M.paired_bootstrap(a, b, seed=3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=30))
def test_bootstrap_interval_brackets_its_own_resample_range(
    pairs: list[tuple[float, float]],
) -> None:
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    iv = M.paired_bootstrap(a, b, resamples=200)
    diffs = [y - x for x, y in pairs]
    assert min(diffs) - 1e-9 <= iv.low <= iv.high <= max(diffs) + 1e-9


def test_paired_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        M.paired_bootstrap([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no items"):
        M.paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        M.paired_bootstrap([1.0], [1.0], confidence=1.0)


def test_backward_transfer_follows_trace() -> None:
    # R_{T,1} = 0.6 after R_{1,1} = 0.8; R_{T,2} = 0.7 after R_{2,2} = 0.7: (-0.2 + 0) / 2
    assert M.backward_transfer([0.6, 0.7], [0.8, 0.7]) == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        M.backward_transfer([], [])
    with pytest.raises(ValueError):
        M.backward_transfer([0.1], [0.1, 0.2])


@pytest.mark.parametrize(
    ("case", "answer", "passed", "why"),
    [
        ({"prompt": "q", "must_contain": "Paris"}, "It is paris.", True, "ok"),
        ({"prompt": "q", "must_contain": ["Paris", "France"]}, "Paris", False, "missing 'France'"),
        ({"prompt": "q", "must_not_contain": "sorry"}, "Sorry, no", False, "contains 'sorry'"),
        ({"prompt": "q", "regex": r"\b\d{4}\b"}, "in 1969", True, "ok"),
        ({"prompt": "q", "regex": r"^\d+$"}, "x1", False, "no match"),
        ({"prompt": "q", "exact": "Yes"}, " yes ", True, "ok"),
        ({"prompt": "q", "exact": "Yes", "ignore_case": False}, "yes", False, "not exactly"),
        ({"messages": [{"role": "user", "content": "q"}], "exact": "4"}, "4", True, "ok"),
    ],
)
def test_golden_checks(case: dict[str, object], answer: str, passed: bool, why: str) -> None:
    ok, detail = M.golden_check(M.golden_case(case, 0), answer)
    assert ok is passed
    assert why in detail


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ({"must_contain": "x"}, "give `prompt`"),
        ({"prompt": "q"}, "needs must_contain"),
        ({"prompt": "q", "regex": "("}, "does not compile"),
        ({"prompt": "q", "must_contain": [1]}, "list of strings"),
        ({"messages": [], "exact": "x"}, "non-empty list"),
    ],
)
def test_bad_golden_cases_are_named(case: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        M.golden_case(case, 2)
