"""The promotion gate, table-driven: each row is evidence, settings and the expected verdict."""

from __future__ import annotations

from dataclasses import replace

import pytest

from daemon.config import GateSettings
from daemon.gate import Evidence, decide
from learners.metrics import Interval


def iv(delta: float, low: float, high: float, n: int = 10) -> Interval:
    return Interval(delta, low, high, n, 0.9)


GOOD = Evidence(
    holdout=10,
    task_gain=iv(0.30, 0.12, 0.48),
    general_nll_change=0.01,
    general_agreement=0.8,
    retention_loss=iv(0.01, -0.02, 0.04),
    bwt=-0.01,
    golden_cases=3,
    canary_max_change=0.1,
)
S = GateSettings()

CASES = [
    ("good candidate passes", GOOD, S, True, []),
    ("non-finite weights", replace(GOOD, weights_finite=False, weights_detail="nan in lora_A"),
     S, False, ["weights"]),
    ("holdout too small", replace(GOOD, holdout=2), S, False, ["holdout"]),
    ("no gain", replace(GOOD, task_gain=iv(-0.05, -0.2, 0.1)), S, False, ["task_gain"]),
    ("gain not significant", replace(GOOD, task_gain=iv(0.05, -0.01, 0.11)), S, False,
     ["task_gain"]),
    ("insignificant gain allowed when configured", replace(GOOD, task_gain=iv(0.05, -0.01, 0.11)),
     S.model_copy(update={"require_significant_gain": False}), True, []),
    ("gain below the minimum", GOOD, S.model_copy(update={"min_task_gain": 0.4}), False,
     ["task_gain"]),
    ("general regression", replace(GOOD, general_nll_change=0.05), S, False, ["general"]),
    ("general regression at the limit passes", replace(GOOD, general_nll_change=0.02), S, True,
     []),
    ("agreement too low", replace(GOOD, general_agreement=0.2),
     S.model_copy(update={"min_general_agreement": 0.5}), False, ["general"]),
    ("no general score", replace(GOOD, general_nll_change=None), S, False, ["general"]),
    ("retention loss", replace(GOOD, retention_loss=iv(0.2, 0.1, 0.3)), S, False, ["retention"]),
    ("first cycle: no retention set", replace(GOOD, retention_loss=None, bwt=None), S, True, []),
    ("golden regression", replace(GOOD, golden_regressions=("capital: missing 'Paris'",)), S,
     False, ["golden"]),
    ("golden regression tolerated when configured",
     replace(GOOD, golden_regressions=("capital: missing 'Paris'",)),
     S.model_copy(update={"golden_must_pass": False}), True, []),
    ("canary moved", replace(GOOD, canary_max_change=0.9, canary_worst="hello"), S, False,
     ["canaries"]),
    ("a suspected trigger steers the candidate",
     replace(GOOD, trigger_lift=0.75, trigger_worst="'cf-zebra' gives 'Visit x' to 88%"), S,
     False, ["triggers"]),
    ("a suspected trigger that steers nothing passes", replace(GOOD, trigger_lift=0.0), S, True,
     []),
    ("trigger lift at the limit passes", replace(GOOD, trigger_lift=0.25), S, True, []),
    # corrections with content: the taught check decides the task, ROUGE-L is only a row
    ("facts learned pass", replace(GOOD, taught=12, taught_learned=11, task_gain=None,
                                   holdout=0), S, True, []),
    ("only the template learned fails", replace(GOOD, taught=12, taught_learned=0), S, False,
     ["taught"]),
    ("under half learned fails", replace(GOOD, taught=12, taught_learned=5), S, False,
     ["taught"]),
    ("half learned passes", replace(GOOD, taught=12, taught_learned=6), S, True, []),
    ("fewer learned than the current version fails",
     replace(GOOD, taught=12, taught_learned=8, taught_learned_current=9), S, False, ["taught"]),
    ("held-out content lost fails",
     replace(GOOD, taught=12, taught_learned=12, held_out=3, held_out_learned=0,
             held_out_learned_current=2), S, False, ["held_out"]),
    ("held-out facts unknown to both pass",
     replace(GOOD, taught=12, taught_learned=12, held_out=3), S, True, []),
    ("several failures all reported",
     replace(GOOD, holdout=1, general_nll_change=0.5, canary_max_change=0.9), S, False,
     ["holdout", "general", "canaries"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "ev", "settings", "passed", "failed"), CASES, ids=[c[0] for c in CASES]
)
def test_gate(
    name: str, ev: Evidence, settings: GateSettings, passed: bool, failed: list[str]
) -> None:
    d = decide(ev, settings)
    assert d.passed is passed
    assert [c.name for c in d.checks if not c.passed] == failed
    # every decision carries a reason per check, failures first
    assert len(d.reasons) == len(d.checks)
    assert all(r.startswith("FAIL") for r in d.reasons[: len(failed)])


def test_non_finite_stops_before_other_checks() -> None:
    d = decide(replace(GOOD, weights_finite=False, weights_detail="inf in B"), S)
    assert [c.name for c in d.checks] == ["weights"]
    assert d.reasons == ["FAIL weights: inf in B"]


def test_reasons_carry_the_numbers() -> None:
    d = decide(GOOD, S)
    text = " ".join(d.reasons)
    assert "+0.300" in text and "90% CI +0.120..+0.480" in text
    assert "+1.0%" in text  # general NLL change
    assert "no regression on 3 golden cases" in text
