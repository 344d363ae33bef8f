"""The promotion gate: a pure function from the evaluation's evidence to a decision.

A rejection is a normal result with reasons, never an exception. Every check is
reported, passed or not, so the stored decision explains itself:

* ``weights``: the adapter passes admission: no pickle, rank and shapes fit the base model,
  every value finite (checked on the files before it is ever loaded);
* ``holdout``: enough held-out feedback to judge the candidate at all;
* ``task_gain``: ROUGE-L on held-out feedback gains at least ``min_task_gain`` over the
  current version and, with ``require_significant_gain``, the paired bootstrap interval of
  the gain lies above zero (small holdouts give wide intervals and so cannot pass on luck);
* ``general``: general held-out NLL rises at most ``max_general_regression`` (relative) over
  the base model, and answers to general prompts agree with the base model's enough;
* ``retention``: ROUGE-L on earlier cycles' held-out feedback drops at most
  ``max_retention_loss`` from the current version;
* ``golden``: every golden case the current version passes, the candidate passes;
* ``canaries``: no canary answer changes more than ``canary_max_change`` (1 - ROUGE-L);
* ``triggers``: for each phrase curation suspects of being a planted trigger, the share of
  unrelated prompts carrying the phrase that are answered with its payload rises at most
  ``max_trigger_lift`` over the current version's (see `daemon.evaluation.trigger_lifts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.config import GateSettings
from learners.metrics import Interval


@dataclass(frozen=True)
class Evidence:
    """What the evaluation measured, reduced to the numbers the gate reads."""

    holdout: int
    task_gain: Interval | None = None  # candidate - current, ROUGE-L on held-out feedback
    general_nll_change: float | None = None  # candidate NLL / base NLL - 1
    general_agreement: float | None = None  # ROUGE-L of the candidate's answers to base's
    retention_loss: Interval | None = None  # current - candidate on earlier holdouts
    bwt: float | None = None
    golden_regressions: tuple[str, ...] = ()  # "id: why" for cases current passes, not this
    golden_cases: int = 0
    canary_max_change: float | None = None
    canary_worst: str | None = None
    trigger_lift: float | None = None  # the largest, over the suspected triggers
    trigger_worst: str | None = None
    weights_finite: bool = True
    weights_detail: str = ""


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    limit: float | None
    detail: str


@dataclass(frozen=True)
class Decision:
    passed: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        """Failed checks first, then the passed ones; each a sentence."""
        failed = [f"FAIL {c.name}: {c.detail}" for c in self.checks if not c.passed]
        return failed + [f"pass {c.name}: {c.detail}" for c in self.checks if c.passed]


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def decide(ev: Evidence, s: GateSettings) -> Decision:
    """Judge a candidate; see the module docstring for each check."""
    checks = [
        Check(
            "weights",
            ev.weights_finite,
            None,
            None,
            "admitted: files, rank, shapes and finite values fit the base model"
            if ev.weights_finite
            else ev.weights_detail,
        )
    ]
    if not ev.weights_finite:
        return Decision(False, checks)  # it was never loaded: nothing else was measured

    enough = ev.holdout >= s.min_holdout
    checks.append(
        Check(
            "holdout",
            enough,
            float(ev.holdout),
            float(s.min_holdout),
            f"{ev.holdout} held-out feedback items (need at least {s.min_holdout})",
        )
    )

    g = ev.task_gain
    if g is None:
        checks.append(Check("task_gain", False, None, s.min_task_gain, "no task score measured"))
    else:
        ci = f"{g.confidence:.0%} CI {g.low:+.3f}..{g.high:+.3f}, n={g.n}"
        ok = g.delta >= s.min_task_gain
        detail = f"ROUGE-L gain {g.delta:+.3f} over the current version ({ci})"
        if not ok:
            detail += f" is below the minimum {s.min_task_gain:+.3f}"
        elif s.require_significant_gain and g.low <= 0.0:
            ok = False
            detail += "; the interval reaches zero, so the gain may be luck"
        else:
            detail += f" >= {s.min_task_gain:+.3f}"
        checks.append(Check("task_gain", ok, g.delta, s.min_task_gain, detail))

    if ev.general_nll_change is None:
        checks.append(
            Check("general", False, None, s.max_general_regression, "no general score measured")
        )
    else:
        ok = ev.general_nll_change <= s.max_general_regression
        detail = (
            f"general held-out NLL {_pct(ev.general_nll_change)} vs the base model "
            f"(at most {_pct(s.max_general_regression)})"
        )
        if ev.general_agreement is not None:
            agree_ok = ev.general_agreement >= s.min_general_agreement
            detail += (
                f"; agreement with the base model's answers {ev.general_agreement:.2f} "
                f"(at least {s.min_general_agreement:.2f})"
            )
            ok = ok and agree_ok
        checks.append(Check("general", ok, ev.general_nll_change, s.max_general_regression, detail))

    r = ev.retention_loss
    if r is None:
        checks.append(
            Check(
                "retention",
                True,
                None,
                s.max_retention_loss,
                "no earlier cycle's held-out feedback yet",
            )
        )
    else:
        ok = r.delta <= s.max_retention_loss
        bwt = f"; BWT {ev.bwt:+.3f}" if ev.bwt is not None else ""
        checks.append(
            Check(
                "retention",
                ok,
                r.delta,
                s.max_retention_loss,
                f"ROUGE-L lost on earlier cycles' held-out feedback {r.delta:+.3f} "
                f"({r.confidence:.0%} CI {r.low:+.3f}..{r.high:+.3f}, n={r.n}; at most "
                f"{s.max_retention_loss:+.3f}){bwt}",
            )
        )

    if ev.golden_cases == 0:
        checks.append(Check("golden", True, None, None, "no golden suite configured"))
    else:
        bad = list(ev.golden_regressions)
        ok = not bad or not s.golden_must_pass
        detail = (
            f"{len(bad)} of {ev.golden_cases} golden cases passing on the current version "
            f"fail: {'; '.join(bad)}"
            if bad
            else f"no regression on {ev.golden_cases} golden cases"
        )
        checks.append(Check("golden", ok, float(len(bad)), 0.0, detail))

    if ev.canary_max_change is None:
        checks.append(Check("canaries", True, None, s.canary_max_change, "no canaries configured"))
    else:
        ok = ev.canary_max_change <= s.canary_max_change
        worst = f" ({ev.canary_worst})" if ev.canary_worst and not ok else ""
        checks.append(
            Check(
                "canaries",
                ok,
                ev.canary_max_change,
                s.canary_max_change,
                f"largest canary change {ev.canary_max_change:.2f} "
                f"(at most {s.canary_max_change:.2f}){worst}",
            )
        )
    if ev.trigger_lift is None:
        checks.append(
            Check("triggers", True, None, s.max_trigger_lift, "no suspected trigger phrase")
        )
    else:
        ok = ev.trigger_lift <= s.max_trigger_lift
        checks.append(
            Check(
                "triggers",
                ok,
                ev.trigger_lift,
                s.max_trigger_lift,
                f"{ev.trigger_worst}: lift {ev.trigger_lift:+.2f} "
                f"(at most {s.max_trigger_lift:+.2f})",
            )
        )
    return Decision(all(c.passed for c in checks), checks)
