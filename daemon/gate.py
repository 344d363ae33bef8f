"""The promotion gate: a pure function from the evaluation's evidence to a decision.

A rejection is a normal result with reasons, never an exception. Every check is
reported, passed or not, so the stored decision explains itself:

* ``weights``: the adapter passes admission: no pickle, rank and shapes fit the base model,
  every value finite (checked on the files before it is ever loaded);
* ``taught``: of the corrections the cycle trained on that carry content (words that neither
  the prompt nor the served answer had, nor the cycle's template: `learners.metrics`), the
  candidate answers at least ``min_taught_learned`` with that content, and no fewer than the
  current version does. This is what the cycle is for; a candidate that learned only the
  corrections' form, with made-up words where the taught ones belong, fails it;
* ``held_out``: on held-out corrections (never trained on) the candidate answers no fewer
  with their content than the current version (facts it could not know stay unknown; what
  generalises shows here);
* when no correction of the cycle carries content (a house style: one answer for many
  prompts, or thumbs-up only), the task is judged on held-out feedback instead:
  ``holdout``: enough of it; ``task_gain``: ROUGE-L gains at least ``min_task_gain`` over the
  current version and, with ``require_significant_gain``, the paired bootstrap interval of the
  gain lies above zero (small holdouts give wide intervals and so cannot pass on luck);
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
    taught: int = 0  # trained corrections with content
    taught_learned: int = 0  # of those, answered with their content by the candidate
    taught_learned_current: int = 0  # ... by the current version
    held_out: int = 0  # held-out corrections with content
    held_out_learned: int = 0
    held_out_learned_current: int = 0
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


def _weights(ev: Evidence, s: GateSettings) -> list[Check]:
    detail = "admitted: files, rank, shapes and finite values fit the base model"
    return [Check("weights", ev.weights_finite, None, None,
                  detail if ev.weights_finite else ev.weights_detail)]  # fmt: skip


def _taught(ev: Evidence, s: GateSettings) -> list[Check]:
    if ev.taught == 0:
        return _holdout(ev, s) + _task_gain(ev, s)
    share = ev.taught_learned / ev.taught
    ok = share >= s.min_taught_learned and ev.taught_learned >= ev.taught_learned_current
    detail = (
        f"taught: {ev.taught_learned} of {ev.taught} corrections answered with their content "
        f"({share:.0%}; at least {s.min_taught_learned:.0%}; current version "
        f"{ev.taught_learned_current} of {ev.taught})"
    )
    checks = [Check("taught", ok, share, s.min_taught_learned, detail)]
    held = ev.held_out_learned >= ev.held_out_learned_current
    checks.append(
        Check(
            "held_out",
            held,
            float(ev.held_out_learned),
            float(ev.held_out_learned_current),
            f"held out: {ev.held_out_learned} of {ev.held_out} never-trained corrections "
            f"answered with their content (current version {ev.held_out_learned_current})"
            if ev.held_out
            else "no held-out correction with content this cycle",
        )
    )
    return checks


def _holdout(ev: Evidence, s: GateSettings) -> list[Check]:
    enough = ev.holdout >= s.min_holdout
    detail = f"{ev.holdout} held-out feedback items (need at least {s.min_holdout})"
    return [Check("holdout", enough, float(ev.holdout), float(s.min_holdout), detail)]


def _task_gain(ev: Evidence, s: GateSettings) -> list[Check]:
    g = ev.task_gain
    if g is None:
        return [Check("task_gain", False, None, s.min_task_gain, "no task score measured")]
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
    return [Check("task_gain", ok, g.delta, s.min_task_gain, detail)]


def _general(ev: Evidence, s: GateSettings) -> list[Check]:
    limit = s.max_general_regression
    if ev.general_nll_change is None:
        return [Check("general", False, None, limit, "no general score measured")]
    ok = ev.general_nll_change <= limit
    detail = (
        f"general held-out NLL {_pct(ev.general_nll_change)} vs the base model "
        f"(at most {_pct(limit)})"
    )
    if ev.general_agreement is not None:
        detail += (
            f"; agreement with the base model's answers {ev.general_agreement:.2f} "
            f"(at least {s.min_general_agreement:.2f})"
        )
        ok = ok and ev.general_agreement >= s.min_general_agreement
    return [Check("general", ok, ev.general_nll_change, limit, detail)]


def _retention(ev: Evidence, s: GateSettings) -> list[Check]:
    r = ev.retention_loss
    if r is None:
        detail = "no earlier cycle's held-out feedback yet"
        return [Check("retention", True, None, s.max_retention_loss, detail)]
    bwt = f"; BWT {ev.bwt:+.3f}" if ev.bwt is not None else ""
    detail = (
        f"ROUGE-L lost on earlier cycles' held-out feedback {r.delta:+.3f} "
        f"({r.confidence:.0%} CI {r.low:+.3f}..{r.high:+.3f}, n={r.n}; at most "
        f"{s.max_retention_loss:+.3f}){bwt}"
    )
    return [Check("retention", r.delta <= s.max_retention_loss, r.delta, s.max_retention_loss,
                  detail)]  # fmt: skip


def _golden(ev: Evidence, s: GateSettings) -> list[Check]:
    if ev.golden_cases == 0:
        return [Check("golden", True, None, None, "no golden suite configured")]
    bad = list(ev.golden_regressions)
    detail = (
        f"{len(bad)} of {ev.golden_cases} golden cases passing on the current version "
        f"fail: {'; '.join(bad)}"
        if bad
        else f"no regression on {ev.golden_cases} golden cases"
    )
    return [Check("golden", not bad or not s.golden_must_pass, float(len(bad)), 0.0, detail)]


def _canaries(ev: Evidence, s: GateSettings) -> list[Check]:
    if ev.canary_max_change is None:
        return [Check("canaries", True, None, s.canary_max_change, "no canaries configured")]
    ok = ev.canary_max_change <= s.canary_max_change
    worst = f" ({ev.canary_worst})" if ev.canary_worst and not ok else ""
    detail = (
        f"largest canary change {ev.canary_max_change:.2f} "
        f"(at most {s.canary_max_change:.2f}){worst}"
    )
    return [Check("canaries", ok, ev.canary_max_change, s.canary_max_change, detail)]


def _triggers(ev: Evidence, s: GateSettings) -> list[Check]:
    if ev.trigger_lift is None:
        return [Check("triggers", True, None, s.max_trigger_lift, "no suspected trigger phrase")]
    ok = ev.trigger_lift <= s.max_trigger_lift
    detail = f"{ev.trigger_worst}: lift {ev.trigger_lift:+.2f} (at most {s.max_trigger_lift:+.2f})"
    return [Check("triggers", ok, ev.trigger_lift, s.max_trigger_lift, detail)]


# The checks in the order the decision lists them; each reads the evidence and the settings.
CHECKS = (_taught, _general, _retention, _golden, _canaries, _triggers)


def decide(ev: Evidence, s: GateSettings) -> Decision:
    """Judge a candidate; see the module docstring for each check."""
    checks = _weights(ev, s)
    if not ev.weights_finite:
        return Decision(False, checks)  # it was never loaded: nothing else was measured
    for check in CHECKS:
        checks += check(ev, s)
    return Decision(all(c.passed for c in checks), checks)
