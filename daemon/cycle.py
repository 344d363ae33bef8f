"""One adaptation cycle, as a recipe:

    snapshot → curate → train (`daemon.candidate`) → evaluate (`daemon.evaluation`)
    → gate (`daemon.gate`) → finalize the version → promote, wait or reject → report

Each stage is persisted in the cycle's row (``cycles`` table) before it starts, so the
operator (and, after a crash, the next start) sees where a cycle stood. A rejection is a
normal outcome with reasons. A candidate with non-finite weights is rejected before it is
ever loaded into vLLM. The candidate is evaluated under its own name from its staging
folder, then unloaded; its final folder (manifest with metrics and decision) is what
promotion loads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from daemon.candidate import (
    Candidate,
    CandidateError,
    CandidateInputs,
    Generate,
    build_candidate,
)
from daemon.config import Settings
from daemon.evaluation import Scorer, SuiteError, Summary, build_suite, summarize
from daemon.gate import Decision, Evidence, decide
from daemon.promotion import Promoter, PromotionError
from daemon.report import write_report
from daemon.versions import Manifest, State, Verdict, finalize, registration, staging_dir
from feedback.store import Cycle, Store
from learners.lora import admission_problems
from learners.run import TrainingFailed
from learners.run import stopping as learner_stopping
from learners.score import ScoringFailed, score_in_child
from serving.engine import BASE_NAME, EngineError, VllmEngine

log = logging.getLogger(__name__)

TERMINAL = ("done", "rejected", "awaiting_approval", "failed")


def _fault_pauses(spec: str) -> dict[str, float]:
    """Fault injection for the crash tests: ``ADAPTD_FAULT_PAUSE="promoting=8"`` holds a cycle
    that long right after it enters the state, so a test can kill the daemon there."""
    out = {}
    for part in spec.split(","):
        state, _, seconds = part.partition("=")
        if state.strip() and seconds.strip():
            out[state.strip()] = float(seconds)
    return out


FAULT_PAUSE = _fault_pauses(os.environ.get("ADAPTD_FAULT_PAUSE", ""))


class CycleInterrupted(Exception):
    """The daemon is stopping: the cycle keeps its state and resumes at the next start."""


class CycleRunning(Exception):
    status = 409
    type = "invalid_request_error"
    code = "cycle_running"


@dataclass
class CycleDeps:
    settings: Settings
    base_model: str
    reader: Store
    writer: Any  # feedback.writer.Writer
    engine: VllmEngine
    promoter: Promoter
    tokenizer: Callable[[], Any]
    on_state: Callable[[Cycle], None] | None = None  # metrics

    @property
    def adapters(self) -> Path:
        return self.settings.data_dir / "adapters"

    @property
    def reports(self) -> Path:
        return self.settings.data_dir / "reports"


def new_cycle(trigger: str) -> Cycle:
    now = time.time()
    return Cycle(
        id=f"c-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{uuid.uuid4().hex[:6]}",
        created_at=now,
        state="queued",
        detail={"trigger": trigger},
    )


async def save(deps: CycleDeps, cycle: Cycle, **changes: Any) -> Cycle:
    cycle = replace(cycle, **changes)
    stored: Cycle = await deps.writer.call(lambda s: s.put_cycle(cycle))
    if deps.on_state is not None:
        deps.on_state(stored)
    if cycle.state in FAULT_PAUSE:
        log.warning("fault injection: pausing %.1f s in %s", FAULT_PAUSE[cycle.state], cycle.state)
        await asyncio.sleep(FAULT_PAUSE[cycle.state])
    log.info(
        "cycle %s: %s%s", cycle.id, cycle.state, f" ({cycle.version})" if cycle.version else ""
    )
    return stored


async def evaluate(
    deps: CycleDeps, cand: Candidate, path: Path
) -> tuple[Summary, dict[str, Any] | None]:
    """Score base, current and candidate; the candidate from its staging folder ``path``."""
    cfg = deps.settings.evaluation
    suite = build_suite(cfg, path, deps.adapters, cand.parent)
    work = deps.settings.data_dir / "work" / f"eval-{cand.version}"

    async def likelihood(
        adapters: dict[str, str], models: list[str | None], seqs: list[dict[str, list[int]]]
    ) -> dict[str, list[list[float]]]:
        job = {"base_model": deps.base_model, "adapters": adapters, "models": models,
               "sequences": seqs}  # fmt: skip
        return await asyncio.to_thread(score_in_child, work, job)

    scorer = Scorer(
        deps.engine,
        likelihood,
        deps.tokenizer(),
        cfg,
        max_len=deps.settings.serving.max_model_len or 2048,
        progress=lambda m: log.info("evaluating %s: %s", cand.version, m),
    )
    current = deps.promoter.promoted
    models: dict[str, str | None] = {"base": None}
    adapters = {cand.version: str(path)}
    if current is not None:
        models[current] = current
        adapters[current] = str(deps.adapters / current)
    models[cand.version] = cand.version
    await deps.engine.load_adapter(cand.version, str(path))
    try:
        scores = await scorer.score(suite, models, adapters)
        cost = await scorer.serving_cost(suite.general_prompts, cand.version)
    finally:
        await deps.engine.unload_adapter(cand.version)
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(
        suite,
        scores["base"],
        scores[current] if current is not None else scores["base"],
        scores[cand.version],
        cfg,
    )
    return summary, cost


def _history(deps: CycleDeps, extra: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every version's scores, oldest first, with ``extra`` (this cycle's version, scored by
    this evaluation) last: in place of its own row when it is registered already, so no
    version is listed twice, and promoted if it was."""
    promoted = {p.version for p in deps.reader.promotions() if p.version}
    rows = []
    for r in deps.reader.versions():
        if extra and r["name"] == extra["version"]:
            continue
        m = Manifest.from_json(r["manifest"])
        ev = (m.metrics.evaluation if m else None) or {}
        rows.append(_history_row(r["name"], r["created_at"], r["name"] in promoted, ev))
    if extra:
        rows.append({**extra, "promoted": bool(extra["promoted"]) or extra["version"] in promoted})
    return rows


def _history_row(
    version: str, created: float, promoted: bool, ev: dict[str, Any]
) -> dict[str, Any]:
    return {
        "version": version,
        "created_at": created,
        "promoted": promoted,
        "general_nll": ev.get("general_nll"),
        "general_agreement": ev.get("general_agreement"),
        "retention_rouge_l": ev.get("retention_rouge_l"),
        "task_rouge_l": ev.get("task_rouge_l"),
        "taught": ev.get("taught"),
    }


def _training_curve(path: Path) -> list[dict[str, Any]]:
    log_file = path / "state" / State.TRAIN_LOG
    if not log_file.is_file():
        return []
    out = []
    for line in log_file.read_text().splitlines():
        r = json.loads(line)
        out.append({k: r.get(k) for k in ("step", "loss", "task_loss", "ewc_penalty")})
    return out


def build_report(
    deps: CycleDeps,
    cycle: Cycle,
    manifest: Manifest | None,
    path: Path | None,
    summary: Summary | None,
    decision: dict[str, Any],
) -> dict[str, Any]:
    """The report's data (schema 1): what `daemon.report` renders."""
    data = manifest.data if manifest else None
    cur = data.curation if data else {}
    train = manifest.metrics.training if manifest else {}
    parent = manifest.parent if manifest else None
    curve = _training_curve(path) if path else []
    this = (
        _history_row(
            cycle.version,
            manifest.created_at if manifest else time.time(),
            decision.get("outcome") == "promoted",
            summary.record,
        )
        if summary and cycle.version
        else None
    )
    return {
        "schema": 1,
        "version": cycle.version,
        "cycle_id": cycle.id,
        "created_at": cycle.created_at,
        "base_model": deps.base_model,
        "parent": parent,
        "current": decision.get("current", parent),
        "decision": decision,
        "data": {
            "feedback_in": len(data.feedback_ids) if data else 0,
            "kept": data.train_examples if data else None,
            "carried": data.carried_examples if data else None,
            "holdout": data.holdout_examples if data else None,
            "eval_only": cur.get("eval_only"),
            "dropped": {
                k: len(v) if isinstance(v, list) else v
                for k, v in (cur.get("dropped") or {}).items()
            },
            "replay": data.replay if data else {},
        },
        "training": {
            "steps": train.get("steps"),
            "seconds": train.get("seconds") or train.get("elapsed_s"),
            "first_loss": train.get("first_loss"),
            "final_loss": train.get("final_loss"),
            "epochs": train.get("epochs"),
            "planned_steps": train.get("planned_steps"),
            "stop": train.get("stop"),
            "taught_checks": train.get("taught_checks") or [],
            "kept_check": train.get("kept_check"),
            "curve": curve,
        },
        "learning": summary.learning if summary else None,
        "metrics": summary.metrics if summary else [],
        "history": _history(deps, this),
        "examples": summary.examples if summary else {"gains": [], "regressions": []},
        "serving_cost": decision.get("serving_cost"),
        "golden": summary.golden if summary else [],
        "suspected_triggers": cur.get("suspected_triggers") or [],
        "triggers": summary.triggers if summary else [],
        "links": {"adapter": f"adapters/{cycle.version}"} if cycle.version else {},
    }


def served_generator(
    engine: VllmEngine, served: str, max_tokens: int, temperature: float
) -> Generate:
    """Answers of the served version, the model the candidate is to replace (the base model
    while none is promoted, or if the served version left vLLM meanwhile: a rollback during
    the cycle): sampled at temperature 1 for self-replay, greedy for the rewrites of
    self-distillation (`training.targets = "rewrites"`)."""

    async def generate(chat: list[dict[str, str]]) -> tuple[str, bool]:
        model = served if served in engine.loaded_adapters else BASE_NAME
        g = await engine.generate(chat, model=model, max_tokens=max_tokens, temperature=temperature)
        return g.text, g.finish_reason == "length"

    return generate


def cycle_progress(cycle: Cycle, data_dir: Path, now: float) -> dict[str, Any]:
    """Where a running cycle is, for `/admin/status` and `adaptd status`: its stage, how long
    it has run and, while training, the last step of the training child's log
    (``work/<version>/progress.jsonl``) against the step budget, with the time the rest of
    the budget would take at the pace of this training process's loop so far (the stopping
    rule usually ends sooner)."""
    out: dict[str, Any] = {
        "id": cycle.id,
        "state": cycle.state,
        "version": cycle.version,
        "running_s": round(max(0.0, now - cycle.created_at), 1),
        "training": None,
    }
    if cycle.state != "training" or not cycle.version:
        return out
    last = _last_line(data_dir / "work" / cycle.version / "progress.jsonl")
    if last is None:
        return out
    try:
        r = json.loads(last)
        step, total, elapsed = int(r["step"]), int(r["total"]), float(r["elapsed_s"])
        done, loop_s = step - int(r["loop_from"]), float(r["loop_s"])
    except (ValueError, KeyError, TypeError):
        return out  # a line being written, or a log from before these fields were recorded
    left = loop_s / done * max(0, total - step) if done > 0 else None
    out["training"] = {
        "step": step,
        "of": total,
        "elapsed_s": round(elapsed, 1),
        "left_at_most_s": round(left, 1) if left is not None else None,
    }
    return out


def _last_line(path: Path, chunk: int = 4096) -> str | None:
    """The last complete line of a file that grows by whole lines (None: no such line)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chunk))
            lines = f.read().split(b"\n")
    except OSError:
        return None
    # the part after the last newline is a line still being written
    done = [x for x in lines[:-1] if x.strip()]
    return done[-1].decode("utf-8", "replace") if done else None


async def run_cycle(deps: CycleDeps, cycle: Cycle, *, actor: str = "scheduler") -> Cycle:
    """Run one cycle to its end; never raises for a failed or rejected candidate."""
    cycle = await save(deps, cycle, state="curating")

    async def on_stage(stage: str, version: str) -> None:
        nonlocal cycle
        cycle = await save(deps, cycle, state=stage, version=version)

    served = deps.promoter.promoted or BASE_NAME
    generate = served_generator(deps.engine, served, deps.settings.replay.self_max_tokens, 1.0)

    try:
        cand = await build_candidate(
            CandidateInputs(
                store=deps.reader,
                data_dir=deps.settings.data_dir,
                base_model=deps.base_model,
                promoted=deps.promoter.promoted,
                generate=generate,
                self_replay_from=served,
                rewrite=served_generator(
                    deps.engine, served, deps.settings.evaluation.max_tokens, 0.0
                ),
                training=deps.settings.training,
                replay=deps.settings.replay,
                curation=deps.settings.curation,
                on_stage=on_stage,
                version=cycle.version,
            )
        )
    except (CandidateError, TrainingFailed, EngineError) as e:
        if learner_stopping():
            raise CycleInterrupted(f"stopped while {cycle.state}") from e
        return await _fail(deps, cycle, f"no candidate: {e}")
    return await judge(deps, cycle, cand, actor=actor)


async def judge(deps: CycleDeps, cycle: Cycle, cand: Candidate, *, actor: str) -> Cycle:
    """Evaluate → gate → finalize the version → promote, wait or reject → report."""
    gate = deps.settings.gate
    path = staging_dir(deps.adapters, cand.version)
    cycle = await save(deps, cycle, state="evaluating", version=cand.version)
    problems = await asyncio.to_thread(
        admission_problems, path, deps.base_model, max_rank=deps.settings.max_lora_rank
    )
    finite, detail = not problems, "; ".join(problems)
    summary: Summary | None = None
    cost = None
    if finite:
        try:
            summary, cost = await evaluate(deps, cand, path)
        except (SuiteError, EngineError, ScoringFailed) as e:
            if learner_stopping():
                raise CycleInterrupted("stopped while evaluating") from e
            return await _fail(deps, cycle, f"evaluation failed: {e}", cand)
        evidence = summary.evidence
    else:
        log.warning("candidate %s is refused: %s; never loaded", cand.version, detail)
        evidence = Evidence(holdout=0, weights_finite=False, weights_detail=detail)

    cycle = await save(deps, cycle, state="deciding")
    verdict: Decision = decide(evidence, gate)
    decision = {
        "passed": verdict.passed,
        "mode": gate.mode,
        "reasons": verdict.reasons,
        "checks": [asdict(c) for c in verdict.checks],
        "current": deps.promoter.promoted,
        "serving_cost": cost,
    }
    outcome = "rejected"
    if verdict.passed:
        outcome = "awaiting_approval" if gate.mode == "manual" else "promoting"
    decision["outcome"] = outcome if outcome != "promoting" else "promoted"
    metrics = replace(
        cand.manifest.metrics,
        evaluation=summary.record if summary else None,
        table=summary.metrics if summary else [],
        probe=summary.probe if summary else None,
        serving_cost=cost,
    )
    verdict_kept = Verdict(
        passed=verdict.passed, mode=gate.mode, reasons=verdict.reasons,
        current=deps.promoter.promoted, serving_cost=cost, outcome=str(decision["outcome"]),
    )  # fmt: skip
    final = await _finalize(deps, cand.manifest.judged(metrics, verdict_kept))
    notes = [r for r in cycle.reasons if r.startswith("resumed after")]
    reasons = [*notes, *verdict.reasons]
    if outcome == "promoting":
        cycle = await save(deps, cycle, state="promoting", reasons=reasons)
        try:
            done = await deps.promoter.promote(
                cand.version, actor=actor, reason=f"cycle {cycle.id}: passed the gate"
            )
            reasons = [*reasons, f"promoted: {done.probe.detail if done.probe else ''}"]
            state, dec = "done", "promoted"
        except (PromotionError, EngineError) as e:
            reasons = [f"FAIL promotion: {e}", *reasons]
            state, dec = "rejected", "rejected"
            decision["outcome"] = "rejected"
    elif outcome == "awaiting_approval":
        state, dec = "awaiting_approval", "awaiting_approval"
    else:
        state, dec = "rejected", "rejected"
    decision["reasons"] = reasons
    report = build_report(deps, replace(cycle, version=cand.version), cand.manifest, final,
                          summary, decision)  # fmt: skip
    write_report(deps.reports, report)
    return await save(
        deps, cycle, state=state, decision=dec, reasons=reasons,
        detail={**cycle.detail, "report": f"reports/{cand.version}/report.html"},
    )  # fmt: skip


async def _finalize(deps: CycleDeps, manifest: Manifest) -> Path:
    """Move the judged version to its final folder and register it in the store."""
    final = await asyncio.to_thread(finalize, deps.adapters, manifest)
    row = registration(deps.adapters, manifest, final)
    await deps.writer.call(lambda s: s.register_version(row))
    return final


def staged_candidate(deps: CycleDeps, version: str) -> Candidate | None:
    """The candidate a crashed cycle left in its staging folder, if it was fully written."""
    path = staging_dir(deps.adapters, version)
    manifest = Manifest.read(path)
    return Candidate(version=version, path=path, manifest=manifest) if manifest else None


async def resume_cycle(deps: CycleDeps, cycle: Cycle, *, actor: str = "restart") -> Cycle:
    """Carry on a cycle that a crash or a stop interrupted, from its last finished stage:

    * queued, curating, training: curation and training again (the same version name);
    * evaluating, deciding: judge the candidate its staging folder holds;
    * promoting: the version is final; promote it unless the history shows it already was.
    """
    note = f"resumed after a restart from state {cycle.state!r}"
    log.info("cycle %s: %s", cycle.id, note)
    cycle = replace(cycle, reasons=[note, *cycle.reasons])
    if cycle.state == "promoting" and cycle.version:
        return await _finish_promotion(deps, cycle, actor)
    cand = staged_candidate(deps, cycle.version) if cycle.version else None
    if cand is not None:
        return await judge(deps, cycle, cand, actor=actor)
    if cycle.version and (deps.adapters / cycle.version).is_dir():
        # finalized, then interrupted before its state was saved: it was judged already
        return await _finish_promotion(deps, cycle, actor)
    if cycle.version:
        shutil.rmtree(deps.settings.data_dir / "work" / cycle.version, ignore_errors=True)
    return await run_cycle(deps, cycle, actor=actor)


async def _finish_promotion(deps: CycleDeps, cycle: Cycle, actor: str) -> Cycle:
    version = cycle.version
    assert version is not None
    row = deps.reader.get_version(version)
    manifest = Manifest.from_json(row["manifest"]) if row else None
    verdict = manifest.decision if manifest else None
    if verdict is None or not verdict.passed:
        reason = (verdict.reasons if verdict else None) or ["the gate did not pass it"]
        return await save(deps, cycle, state="rejected", decision="rejected",
                          reasons=[*cycle.reasons, *reason])  # fmt: skip
    if deps.settings.gate.mode == "manual":
        return await save(deps, cycle, state="awaiting_approval", decision="awaiting_approval")
    if deps.promoter.promoted == version:
        return await save(deps, cycle, state="done", decision="promoted")
    try:
        done = await deps.promoter.promote(
            version, actor=actor, reason=f"cycle {cycle.id}: passed the gate (resumed)"
        )
        detail = done.probe.detail if done.probe else ""
        return await save(deps, cycle, state="done", decision="promoted",
                          reasons=[*cycle.reasons, f"promoted: {detail}"])  # fmt: skip
    except (PromotionError, EngineError) as e:
        return await save(deps, cycle, state="rejected", decision="rejected",
                          reasons=[f"FAIL promotion: {e}", *cycle.reasons])  # fmt: skip


async def _fail(deps: CycleDeps, cycle: Cycle, reason: str, cand: Candidate | None = None) -> Cycle:
    log.warning("cycle %s failed: %s", cycle.id, reason)
    if cand is not None:
        # Judged unusable; keep the folder under its final name so the name stays spent
        # and the files stay inspectable, with the failure in its manifest.
        failed = Verdict(passed=False, mode=None, reasons=[reason], current=None,
                         serving_cost=None, outcome="failed")  # fmt: skip
        await _finalize(deps, replace(cand.manifest, decision=failed))
    decision = {"outcome": "failed", "passed": False, "reasons": [reason], "checks": []}
    if cycle.version:
        write_report(
            deps.reports,
            build_report(deps, cycle, cand.manifest if cand else None, None, None, decision),
        )
    notes = [r for r in cycle.reasons if r.startswith("resumed after")]
    return await save(deps, cycle, state="failed", decision="failed", reasons=[reason, *notes])


async def settle(
    deps: CycleDeps, version: str, *, approve: bool, actor: str, reason: str
) -> Cycle | None:
    """A person's approve / reject of a version awaiting approval; updates its cycle and
    report. Approval promotes (`PromotionError` if the promotion is refused)."""
    cycle = deps.reader.cycle_of_version(version)
    if approve:
        await deps.promoter.promote(version, actor=actor, reason=reason or "approved")
    if cycle is None or cycle.state != "awaiting_approval":
        return cycle
    line = f"{'approved' if approve else 'rejected'} by {actor}" + (f": {reason}" if reason else "")
    cycle = await save(
        deps,
        cycle,
        state="done" if approve else "rejected",
        decision="promoted" if approve else "rejected",
        reasons=[line, *cycle.reasons],
    )
    from daemon.report import load_report

    report = load_report(deps.reports, version)
    if report is not None:
        report["decision"] = {
            **report.get("decision", {}),
            "outcome": cycle.decision,
            "reasons": cycle.reasons,
        }
        write_report(deps.reports, report)
    return cycle
