"""Turn the feedback collected since the promoted version into a candidate adapter version.

One linear recipe, each stage a short function returning a dataclass:

    snapshot → curate → replay → train (child process) → write the version folder → register

The version folder, its `Manifest` and its ``state/`` files belong to `daemon.versions`; this
module decides what goes into them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import CurationConfig, ReplaySettings, TrainingSettings
from daemon.versions import (
    DataUsed,
    Manifest,
    Metrics,
    State,
    clear_half_written,
    next_name,
    read_jsonl,
    read_reservoir,
    state_dir,
    write_jsonl,
    write_staged,
)
from feedback.curate import CurationResult, CurationSettings, Example, curate
from feedback.store import Feedback, Interaction, Store
from learners import metrics as M
from learners import replay as replay_lib
from learners.data import Messages
from learners.lora import LoraSettings
from learners.run import ChildOutcome, TrainingFailed, run_job, write_job
from learners.train import TrainJob, TrainSettings

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]
# A sampled answer to a chat, and whether the token limit cut it off.
Generate = Callable[[Chat], Awaitable[tuple[str, bool]]]


class CandidateError(Exception):
    status = 409
    type = "invalid_request_error"
    code = "no_candidate"


@dataclass(frozen=True)
class Snapshot:
    since: float
    until: float
    pairs: list[tuple[Feedback, Interaction]]


@dataclass(frozen=True)
class ReplayMix:
    examples: list[Chat]
    sources: list[str]  # each example's pool: general, self or past
    counts: dict[str, int]
    general_pool: list[Chat]  # for the first cycle's Fisher
    reservoir: list[Chat]  # what the next cycle may replay from this version
    reservoir_seen: int


@dataclass(frozen=True)
class Candidate:
    """A trained version in its staging folder, not yet judged."""

    version: str
    path: Path
    manifest: Manifest = field(repr=False)

    @property
    def parent(self) -> str | None:
        return self.manifest.parent


# -- stages -----------------------------------------------------------------------------------
def snapshot(store: Store, since: float) -> Snapshot:
    until = time.time()
    pairs = [
        (fb, i)
        for fb, i in store.iter_feedback_with_interactions()
        if since < fb.created_at <= until
    ]
    return Snapshot(since=since, until=until, pairs=pairs)


def curate_snapshot(snap: Snapshot, cfg: CurationConfig) -> CurationResult:
    return curate(
        snap.pairs,
        CurationSettings(
            holdout_fraction=cfg.holdout_fraction,
            max_example_chars=cfg.max_example_chars,
            max_per_user=cfg.max_per_user,
            max_user_share=cfg.max_user_share,
            near_duplicate_threshold=cfg.near_duplicate_threshold,
            drop_suspected_triggers=cfg.drop_suspected_triggers,
            trigger_min_examples=cfg.trigger_min_examples,
        ),
    )


def self_replay_prompts(
    store: Store, prompts_path: str | None, limit: int, rng: random.Random
) -> list[Chat]:
    """General prompts: past chats that got no feedback, plus an optional prompt file."""
    prompts: list[Chat] = []
    for req in store.unrated_chat_requests(5000):
        msgs = json.loads(req or "[]")
        if (
            msgs
            and all(isinstance(m.get("content"), str) for m in msgs)
            and msgs[-1].get("role") == "user"
        ):
            prompts.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if prompts_path:
        with open(prompts_path, encoding="utf-8") as f:
            prompts += [[{"role": "user", "content": line.strip()}] for line in f if line.strip()]
    rng.shuffle(prompts)
    return prompts[:limit]


async def build_replay(
    store: Store,
    cfg: ReplaySettings,
    n_new: int,
    parent_state: Path | None,
    new_examples: Sequence[Chat],
    generate: Generate,
    seed: int,
) -> ReplayMix:
    rng = random.Random(seed)
    past, seen = read_reservoir(parent_state)
    general = (
        replay_lib.load_general(cfg.general_path, limit=10_000, seed=seed)
        if cfg.general_path
        else []
    )
    total = replay_lib.replay_total(n_new, cfg.ratio, cfg.min_examples)
    prompts = self_replay_prompts(store, cfg.prompts_path, limit=max(1, total), rng=rng)
    counts = replay_lib.replay_counts(
        {"general": cfg.general_share, "self": cfg.self_share, "past": cfg.past_share},
        {"general": bool(general), "self": bool(prompts), "past": bool(past)},
        total,
    )
    # The served model's own *sampled* answers (temperature 1): training on a model's samples
    # has zero expected gradient at that model, so they anchor its behaviour without sharpening
    # it. The served model, not the base: the base model's answers would unteach what earlier
    # cycles taught (`generate` is the caller's; docs/learning.md has the figures).
    chosen = [prompts[i % len(prompts)] for i in range(counts["self"])] if prompts else []
    sem = asyncio.Semaphore(8)

    async def answer(p: Chat) -> Chat:
        async with sem:
            text, cut = await generate(p)
        # a cut-off answer is trained without its end of turn (`learners.data.tokenize_chat`)
        reply: dict[str, Any] = {"role": "assistant", "content": text}
        if cut:
            reply["unfinished"] = True
        return [*p, reply]

    self_examples = [
        c for c in await asyncio.gather(*(answer(p) for p in chosen)) if c[-1]["content"].strip()
    ]
    mixed = (
        replay_lib.mix(
            {"general": general, "self": self_examples, "past": past},
            {
                "general": float(counts["general"]),
                "self": float(counts["self"]),
                "past": float(counts["past"]),
            },
            sum(counts.values()) if (general or self_examples or past) else 0,
            rng,
        )
        if sum(counts.values())
        else []
    )
    got: dict[str, int] = {"general": 0, "self": 0, "past": 0}
    for name, _ in mixed:
        got[name] += 1
    reservoir, seen = replay_lib.reservoir_update(
        past, seen, list(new_examples), cfg.reservoir_size, rng
    )
    return ReplayMix(
        examples=[ex for _, ex in mixed],
        sources=[name for name, _ in mixed],
        counts=got,
        general_pool=(general[:64] + self_examples[:64]),
        reservoir=reservoir,
        reservoir_seen=seen,
    )


def parent_ewc_state(parent_state: Path | None, *, warm_start: bool) -> Path | None:
    """The parent's EWC state, when training continues from the parent's adapter.

    EWC holds the adapter near the weights it anchors; a fresh adapter (warm start off) anchored
    to the parent's weights would be pulled back to the parent's behaviour, so it starts with
    the first-cycle anchor instead."""
    if not warm_start or parent_state is None:
        return None
    path = parent_state / State.EWC
    return path if path.exists() else None


def train_settings(cfg: TrainingSettings, replay: ReplaySettings | None = None) -> TrainSettings:
    return TrainSettings(
        lora=LoraSettings(
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            target_modules=tuple(cfg.target_modules),
        ),
        learning_rate=cfg.learning_rate,
        schedule=cfg.schedule,
        warmup_ratio=cfg.warmup_ratio,
        steps=cfg.steps,
        min_epochs=cfg.min_epochs,
        min_steps=cfg.min_steps,
        max_steps=cfg.max_steps,
        max_epochs=cfg.max_epochs,
        stop_learned=cfg.stop_learned,
        ewc_max_share=cfg.ewc_max_share,
        ewc_mode=cfg.ewc_mode,
        max_len=cfg.max_len,
        batch_tokens=cfg.batch_tokens,
        seed=cfg.seed,
        ewc_lambda=cfg.ewc_lambda,
        ewc_decay=cfg.ewc_decay,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gpu_memory_fraction=cfg.gpu_memory_fraction,
        replay_loss=(replay or ReplaySettings.model_validate({})).loss,
    )


# -- versions on disk ---------------------------------------------------------------------------
def next_version(store: Store, adapters: Path) -> str:
    """The next never-used name: v0001, v0002, ... past every name in the store or on disk."""
    return next_name([*store.version_names(), *store.cycle_versions()], adapters)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("adaptd", "torch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _example_dict(e: Example) -> dict[str, Any]:
    return {
        "messages": e.messages,
        "interaction_id": e.interaction_id,
        "feedback_id": e.feedback_id,
        "kind": e.kind,
        "served": e.served,
    }


# Self-distillation (SDFT): the served version is shown the correction and answers again.
REWRITE_PROMPT = (
    "{question}\n\nA reliable source says: {correction}\n"
    "Answer the question using what the source says."
)


async def rewrite_targets(
    examples: Sequence[Messages], served: Sequence[str], rewrite: Generate
) -> tuple[list[Messages], int]:
    """The taught examples with each correction replaced by the served version's rewrite of
    its answer, the correction in context (``REWRITE_PROMPT``), where the rewrite is complete
    and keeps every content word of the correction (the words neither the question nor the
    served answer had); elsewhere, and for corrections without content (a style), the
    correction itself. Returns the examples and how many were rewritten."""
    out: list[Messages] = []
    done = 0
    for msgs, was in zip(examples, served, strict=True):
        question, correction = str(msgs[-2].get("content", "")), str(msgs[-1]["content"])
        content = M.content_words(correction, prompt=question, served=was)
        if not content or msgs[-2].get("role") != "user":
            out.append(msgs)
            continue
        ask = [dict(m) for m in msgs[:-2]] + [
            {"role": "user",
             "content": REWRITE_PROMPT.format(question=question, correction=correction)}
        ]  # fmt: skip
        text, cut = await rewrite(ask)
        if text.strip() and not cut and M.content_recall(text, content) == 1.0:
            out.append([*msgs[:-1], {"role": "assistant", "content": text.strip()}])
            done += 1
        else:
            out.append(msgs)
    return out, done


def carried_holdout(parent_state: Path | None, exclude: set[str]) -> list[dict[str, Any]]:
    """The promoted version's held-out examples, to be trained on in this cycle.

    A holdout keeps evaluation honest, but a correction held out for good would never be
    learned. So what one cycle held out, the next one trains on (while it holds out some of
    its own feedback): every correction is trained on one cycle late at the latest. An
    interaction with feedback in this cycle's snapshot is left to this cycle's curation."""
    if parent_state is None:
        return []
    out = []
    for row in read_jsonl(parent_state / State.HOLDOUT):
        if row.get("interaction_id") in exclude:
            continue
        msgs = row.get("messages") or []
        if len(msgs) >= 2 and msgs[-1].get("role") == "assistant":
            out.append({**row, "carried": True})
    return out


# -- the recipe -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CandidateInputs:
    store: Store  # read-only use
    data_dir: Path
    base_model: str
    promoted: str | None
    generate: Generate
    training: TrainingSettings
    replay: ReplaySettings
    curation: CurationConfig
    on_stage: Callable[[str, str], Awaitable[None]] | None = None  # (stage, version)
    self_replay_from: str = "base"  # the model `generate` asks, for the manifest
    # Greedy answers of the served version, for `training.targets = "rewrites"`.
    rewrite: Generate | None = None
    version: str | None = None
    min_examples: int = 1
    nan_at_step: int | None = None


async def build_candidate(inp: CandidateInputs) -> Candidate:
    """Snapshot → curate → replay → train → write → register; see the module docstring."""
    adapters = inp.data_dir / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    clear_half_written(adapters)
    parent_dir = adapters / inp.promoted if inp.promoted else None
    parent_manifest = Manifest.read(parent_dir) if parent_dir else None
    since = parent_manifest.data.feedback_until if parent_manifest else 0.0

    snap = snapshot(inp.store, since)
    cur = curate_snapshot(snap, inp.curation)
    parent_state = state_dir(parent_dir) if parent_dir else None
    carried = carried_holdout(parent_state, {e.interaction_id for e in [*cur.train, *cur.holdout]})
    if len(cur.train) + len(carried) < inp.min_examples:
        raise CandidateError(
            f"{len(cur.train)} training examples from {len(snap.pairs)} feedback items since the "
            f"promoted version, {len(carried)} carried from its holdout (need "
            f"{inp.min_examples}); dropped: {cur.report.dropped or 'none'}"
        )
    new = [e.messages for e in cur.train] + [c["messages"] for c in carried]
    rewritten = 0
    if inp.training.targets == "rewrites" and inp.rewrite is not None:
        served = [e.served for e in cur.train] + [str(c.get("served", "")) for c in carried]
        new, rewritten = await rewrite_targets(new, served, inp.rewrite)
    mix = await build_replay(
        inp.store, inp.replay, len(new), parent_state, new, inp.generate, inp.training.seed
    )

    version = inp.version or next_version(inp.store, adapters)
    if inp.on_stage is not None:
        await inp.on_stage("training", version)
    work = inp.data_dir / "work" / version
    shutil.rmtree(work, ignore_errors=True)
    warm = (
        parent_dir
        if (
            inp.training.warm_start and parent_dir and (parent_dir / "adapter_config.json").exists()
        )
        else None
    )
    ewc_state = parent_ewc_state(parent_state, warm_start=warm is not None)
    job = TrainJob(
        base_model=inp.base_model,
        work_dir=work,
        examples=new + mix.examples,
        settings=train_settings(inp.training, inp.replay),
        warm_start=warm,
        ewc_state=ewc_state,
        fisher_examples=mix.general_pool,
        nan_at_step=inp.nan_at_step,
        n_taught=len(new),
    )
    log.info(
        "training %s: %d new examples + %d replayed %s, warm start from %s",
        version, len(new), len(mix.examples), mix.counts, inp.promoted or "a fresh adapter",
    )  # fmt: skip
    try:
        write_job(job)
        outcome: ChildOutcome = await asyncio.to_thread(
            run_job, work, max_restarts=inp.training.max_restarts
        )
    except OSError as e:  # no room for the job's files
        shutil.rmtree(work, ignore_errors=True)
        raise CandidateError(f"could not write the training job of {version}: {e}") from e
    except TrainingFailed as e:
        if e.kind != "stopped":  # a stop keeps the checkpoint for the next start
            shutil.rmtree(work, ignore_errors=True)
        raise
    result = outcome.result

    manifest = Manifest(
        version=version,
        created_at=time.time(),
        parent=inp.promoted,
        base_model=inp.base_model,
        settings={
            "training": inp.training.model_dump(),
            "replay": inp.replay.model_dump(),
            "curation": inp.curation.model_dump(),
        },
        data=DataUsed(
            feedback_since=snap.since,
            feedback_until=snap.until,
            feedback_ids=sorted(fb.id for fb, _ in snap.pairs),
            curation=cur.report.to_dict(),
            replay=mix.counts,
            self_replay_from=inp.self_replay_from,
            train_examples=len(new),
            rewritten_examples=rewritten,
            carried_examples=len(carried),
            carried_from=inp.promoted if carried else None,
            holdout_examples=len(cur.holdout),
        ),
        metrics=Metrics(training=result, training_restarts=outcome.restarts),
        libraries=library_versions(),
    )
    state_files: dict[str, Callable[[Path], object]] = {
        State.RESERVOIR: lambda p: write_jsonl(p, mix.reservoir),
        State.RESERVOIR_META: lambda p: p.write_text(json.dumps({"seen": mix.reservoir_seen})),
        State.HOLDOUT: lambda p: write_jsonl(p, [_example_dict(e) for e in cur.holdout]),
        State.TRAIN: lambda p: write_jsonl(p, [_example_dict(e) for e in cur.train] + carried),
        State.REPLAY: lambda p: write_jsonl(
            p,
            [{"source": s, "messages": m} for s, m in zip(mix.sources, mix.examples, strict=True)],
        ),
        State.EVAL_ONLY: lambda p: write_jsonl(p, [asdict(e) for e in cur.eval_only]),
    }
    try:
        path, manifest = write_staged(
            adapters, manifest, Path(result["adapter_dir"]), work, state_files
        )
    except FileExistsError as e:
        raise CandidateError(str(e)) from e
    except OSError as e:  # e.g. the disk is full; nothing half-written is left
        raise CandidateError(f"could not write version {version}'s folder: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Candidate(version=version, path=path, manifest=manifest)
