"""LoRA SFT on chat examples, with replay already mixed in and an EWC penalty.

`train(job)` is one linear recipe: load → tokenize and pack → (resume) → loop → save adapter →
estimate and consolidate the Fisher → save EWC state. It runs in a child process (see
`learners.run`); everything it needs is in the `TrainJob`, everything it produces lands in
``job.work_dir``:

* ``progress.jsonl``: one line per optimizer step (loss, task loss, EWC penalty, lr, tokens);
* ``checkpoints/latest/``: adapter tensors, optimizer, scheduler and RNG state, written every
  ``checkpoint_every`` steps to a temporary folder and renamed, so a killed run resumes from it;
* ``adapter/``: the PEFT adapter plus ``ewc.safetensors`` once training is done.

Defaults scale with the data: at least ``min_epochs`` passes and ``min_steps`` optimizer steps
(small feedback sets need many steps to learn facts; see docs/learning.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from learners import ewc
from learners.data import (
    IGNORE,
    Messages,
    PackedRow,
    Tokenized,
    batches,
    collate,
    pack,
    shift_loss,
    tokenize_chat,
)
from learners.lora import LoraSettings, load_model, load_trainable, save_adapter, trainable

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; nothing is written."""


class Stopped(RuntimeError):
    """Training was asked to stop; a checkpoint of the last finished step was written."""


_stop = False


def request_stop() -> None:
    """Stop at the next step boundary (signal-safe: only sets a flag)."""
    global _stop
    _stop = True


@dataclass(frozen=True)
class TrainSettings:
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float = 1e-3
    schedule: str = "constant"  # cosine | linear | constant (after warm-up)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    steps: int | None = None  # exact number of optimizer steps (overrides the rest)
    # The budget in passes over the data, and the stopping rule: after each pass from
    # ``min_epochs`` on, the taught examples (the first ``TrainJob.n_taught``) are scored, and
    # training stops once their answers are learned: teacher-forced, at least ``stop_learned``
    # of the taught answers have every token the model's most likely next token.
    min_epochs: float = 2.0
    max_epochs: float = 12.0
    stop_learned: float | None = 0.9  # None: run the whole budget
    min_steps: int = 1
    max_steps: int = 2000
    max_len: int = 1024
    batch_tokens: int = 2048  # tokens per optimizer step (packed rows of max_len)
    seed: int = 0
    ewc_lambda: float = 0.0  # 0 switches EWC off
    ewc_decay: float = 0.9
    # EWC's gradient may cancel at most this share of the task gradient's length
    # (`learners.ewc.add_capped_penalty_grad_`); None: uncapped, lambda alone decides.
    ewc_max_share: float | None = 0.5
    # How the penalty acts: "decoupled", each weight is pulled toward its anchor after the
    # optimizer's step, in proportion to its Fisher (`learners.ewc.pull_toward_anchor_`);
    # "gradient", its gradient joins the task's before the optimizer (ewc_max_share caps it).
    ewc_mode: Literal["gradient", "decoupled"] = "decoupled"
    fisher_batches: int = 16
    # How replayed examples (those after the first ``TrainJob.n_taught``) are fitted: "ce", to
    # their tokens; "kl", to the starting model's next-token distribution along them (its
    # ``distill_top_k`` most likely tokens and the rest as one bucket, computed once before the
    # first step), which holds what the served version would have said instead of sharpening
    # it onto one sample.
    replay_loss: str = "ce"
    distill_top_k: int = 32
    # The tail bucket of distillation (`distill_sum`); False renormalises the top k instead,
    # which sharpens the student (kept only for the benchmarks to compare).
    distill_tail: bool = True
    checkpoint_every: int = 50
    bf16: bool | None = None  # None: on a CUDA GPU only
    # Off by default: it cut peak memory 3x but throughput 1.75x on an H100 (1.7B shape), and
    # packing plus answer-only logits already keep memory under half of the baseline's.
    gradient_checkpointing: bool = False
    device: str | None = None
    # "flex_attention" skips the blocks between packed examples (block-sparse); it compiles a
    # kernel on first use, so rows are padded to max_len to keep one shape. None: flex on a
    # CUDA GPU, SDPA on the CPU.
    attention: str | None = None
    # Cap on this process's share of the GPU's memory (the card is shared with vLLM); an
    # allocation past it raises out-of-memory in the training child, never in serving.
    gpu_memory_fraction: float | None = None


@dataclass(frozen=True)
class TrainJob:
    base_model: str
    work_dir: Path
    examples: Sequence[Messages]  # the cycle's examples plus replay, already mixed
    settings: TrainSettings = field(default_factory=TrainSettings)
    warm_start: Path | None = None  # the promoted adapter, for continual training
    ewc_state: Path | None = None  # ewc.safetensors of the promoted adapter
    # General data for the first cycle's Fisher (at the start, anchored at "no change"); the
    # Fisher at the end of every run is estimated on the run's own examples.
    fisher_examples: Sequence[Messages] = ()
    nan_at_step: int | None = None  # tests: inject a NaN loss at this step
    # The first ``n_taught`` of ``examples`` are what the cycle teaches (its feedback; the rest
    # is replay): the stopping rule scores them. 0: no stopping rule, the whole budget runs.
    n_taught: int = 0
    # Already tokenized examples (benchmarks on random-weight models without a tokenizer):
    # used instead of `examples` / `fisher_examples` when given.
    tokenized: Sequence[Tokenized] | None = None
    pad_id: int = 0


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    examples: int
    dropped_too_long: int
    rows: int
    tokens: int
    target_tokens: int
    seconds: float
    first_loss: float
    final_loss: float
    resumed_from: int
    ewc_lambda: float
    device: str
    loop_seconds: float = 0.0  # the optimizer steps alone
    fisher_seconds: float = 0.0  # Fisher estimation (start and end of the run)
    fisher_start_seconds: float = 0.0  # the first cycle's estimate at the start (first kernels)
    peak_memory_bytes: int = 0  # CUDA only
    epochs: float = 0.0  # passes over the data actually run
    planned_steps: int = 0  # the budget (max_epochs); `steps` is what ran
    stop: str = ""  # why training ended: "learned", "budget" or "steps"
    # After each pass from min_epochs on: the taught answers' teacher-forced token accuracy and
    # mean NLL per token ({"epoch", "step", "token_accuracy", "nll"}).
    taught_checks: list[dict[str, float]] = field(default_factory=list)
    # A run that spent its budget keeps the weights of its best check; this is that check
    # (None: the last step's weights were kept, being the best or the run having stopped early).
    kept_check: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir)
        return d


def steps_per_epoch(n_rows: int, batch_rows: int) -> int:
    return max(1, math.ceil(n_rows / batch_rows))


def plan_steps(n_rows: int, batch_rows: int, s: TrainSettings) -> int:
    """The most steps a run may take: ``max_epochs`` passes (at least ``min_steps``, at most
    ``max_steps``), or exactly ``steps``. The stopping rule usually ends it sooner."""
    if s.steps is not None:
        return s.steps
    per_epoch = steps_per_epoch(n_rows, batch_rows)
    budget = math.ceil(max(s.max_epochs, s.min_epochs) * per_epoch)
    return max(1, min(s.max_steps, max(s.min_steps, budget)))


def check_steps(total: int, per_epoch: int, s: TrainSettings) -> set[int]:
    """The steps (1-based) after which the stopping rule looks: each pass's end from
    ``min_epochs`` on, and the last step (so the result says how well the taught answers
    were learned). None with an exact ``steps`` or no rule."""
    if s.steps is not None or s.stop_learned is None:
        return set()
    first = min(total, max(1, math.ceil(s.min_epochs * per_epoch), s.min_steps))
    return {k for k in range(first, total + 1) if k % per_epoch == 0 or k in (first, total)}


@dataclass(frozen=True)
class Fit:
    """How well answers are learned, teacher-forced: the share of their tokens that are the
    model's most likely next token, the share of answers whose every token is, and the mean
    NLL per token."""

    token_accuracy: float
    exact: float
    nll: float


def taught_fit(
    model: Any,
    rows: Sequence[PackedRow],
    device: torch.device,
    pad_id: int,
    amp: torch.dtype | None,
    batch_rows: int,
) -> Fit:
    """`Fit` of the labelled tokens of ``rows`` (each packed example one answer), without
    dropout or gradients."""
    was = model.training
    model.eval()
    right = total = answers = exact = 0
    nll = 0.0
    try:
        with torch.no_grad():
            for k in range(0, len(rows), batch_rows):
                chunk = rows[k : k + batch_rows]
                b = {n: v.to(device) for n, v in collate(chunk, pad_id).items()}
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model(
                        input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False
                    ).logits[:, :-1]
                targets = b["labels"][:, 1:]
                keep = targets != IGNORE
                picked = logits[keep].float()
                wanted = targets[keep]
                hit = picked.argmax(-1) == wanted
                right += int(hit.sum())
                nll += float(torch.nn.functional.cross_entropy(picked, wanted, reduction="sum"))
                total += int(keep.sum())
                # which example each labelled token belongs to (segments are per row)
                seg = torch.full(targets.shape, -1, dtype=torch.long)
                for i, r in enumerate(chunk):
                    seg[i, : len(r) - 1] = torch.tensor(r.segments[1:]) + i * (targets.shape[1] + 1)
                owner = seg.to(device)[keep]
                ids, inverse = torch.unique(owner, return_inverse=True)
                misses = torch.zeros(len(ids), device=device).index_add_(0, inverse, (~hit).float())
                answers += len(ids)
                exact += int((misses == 0).sum())
    finally:
        model.train(was)
    if not total:
        return Fit(1.0, 1.0, 0.0)
    return Fit(right / total, exact / answers, nll / total)


def lr_lambda(total: int, s: TrainSettings) -> Callable[[int], float]:
    warm = max(1, round(s.warmup_ratio * total)) if s.warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if s.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if s.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _epochs(rows: Sequence[PackedRow], batch_rows: int, seed: int) -> Iterator[list[PackedRow]]:
    epoch = 0
    while True:
        yield from batches(rows, batch_rows, random.Random(seed * 1_000_003 + epoch))
        epoch += 1


def _device(s: TrainSettings) -> torch.device:
    if s.device:
        return torch.device(s.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _save_checkpoint(path: Path, model: Any, opt: Any, sched: Any, step: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {n: p.detach().cpu() for n, p in trainable(model).items()}
    torch.save(
        {
            "step": step,
            "adapter": state,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        tmp / "state.pt",
    )
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model: Any, opt: Any, sched: Any) -> int:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    load_trainable(model, state["adapter"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


Teacher = dict[int, tuple[torch.Tensor, torch.Tensor]]  # id(row) -> (top-k ids, log-probs)


def _loss_fn(
    device: torch.device,
    pad_id: int,
    amp: torch.dtype | None,
    pad_to: int | None,
    teacher: Teacher | None = None,
) -> Callable[[Any, Any], torch.Tensor]:
    """The SFT loss of a batch of packed rows: the mean over answer tokens of the cross-entropy
    against the token, or, on a soft example's tokens with ``teacher`` targets, against the
    teacher's top-k distribution (the KL to it, up to a constant).

    The output layer runs only on the positions that have a label (the answers): for a
    150k-token vocabulary that saves most of the logits' memory and the lm_head's compute on
    prompt tokens, which carry no loss anyway.
    """

    def loss(model: Any, rows: Sequence[PackedRow]) -> torch.Tensor:
        b = {
            k: v.to(device, non_blocking=True)
            for k, v in collate(rows, pad_id, pad_to=pad_to).items()
        }
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder, head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if decoder is None or head is None:  # an unusual architecture: full logits
                logits = model(
                    input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False
                ).logits
                return shift_loss(logits, b["labels"])[0]
            hidden = decoder(
                input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False
            ).last_hidden_state
            targets = b["labels"][:, 1:]
            keep = targets != IGNORE
            logits = head(hidden[:, :-1][keep]).float()
        targets = targets[keep]
        soft = b["soft"][:, 1:][keep]
        if not teacher or not bool(soft.any()) or any(id(r) not in teacher for r in rows):
            return torch.nn.functional.cross_entropy(logits, targets)
        ids = torch.cat([teacher[id(r)][0] for r in rows]).to(device)
        logp_t = torch.cat([teacher[id(r)][1] for r in rows]).to(device).float()
        hard = ~soft
        total = distill_sum(logits[soft], ids, logp_t)
        if bool(hard.any()):
            total = total + torch.nn.functional.cross_entropy(
                logits[hard], targets[hard], reduction="sum"
            )
        return total / targets.numel()

    return loss


def distill_sum(logits: torch.Tensor, ids: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy from a teacher's sparse distribution to the student's
    ``logits`` (one row per position): the teacher's top-k tokens, ``ids`` with their log-probs
    ``logp_t`` (over the whole vocabulary, not renormalised), and one more bucket for the rest
    of the vocabulary, which holds the mass the teacher left to it.

    Without that bucket the targets would sum to one over the top k, and the student's best fit
    would give every other token probability zero: sharper than the teacher, and worse on any
    text whose next token is not among the k (measured: general NLL rose with replay by
    distillation where plain LoRA's did not)."""
    logp_s = torch.log_softmax(logits, dim=-1)
    top_s = logp_s.gather(-1, ids.long())
    p_t = logp_t.exp()
    rest_t = (1.0 - p_t.sum(-1)).clamp(min=0.0)
    # log of the student's mass outside the k tokens, kept finite when the k hold nearly all
    rest_s = torch.log1p(-top_s.exp().sum(-1).clamp(max=1.0 - 1e-6))
    return -((p_t * top_s).sum() + (rest_t * rest_s).sum())


def teacher_targets(
    model: Any,
    rows: Sequence[PackedRow],
    device: torch.device,
    pad_id: int,
    amp: torch.dtype | None,
    top_k: int,
    pad_to: int | None = None,
    tail: bool = True,
) -> Teacher:
    """The model's ``top_k`` most likely next tokens and their log-probabilities (over the
    whole vocabulary: the rest of the mass is the tail that `distill_sum` fits too) at each
    labelled position of the soft examples in ``rows``, in row order: the targets of replay by
    distillation. Computed without dropout or gradients, before training moves it."""
    was = model.training
    model.eval()
    out: Teacher = {}
    try:
        with torch.no_grad():
            for r in rows:
                if not any(r.soft):
                    continue
                b = {n: v.to(device) for n, v in collate([r], pad_id, pad_to=pad_to).items()}
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model(
                        input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False
                    ).logits[:, :-1]
                keep = b["labels"][:, 1:] != IGNORE
                picked = logits[keep][b["soft"][:, 1:][keep]].float()
                top = torch.log_softmax(picked, dim=-1).topk(min(top_k, picked.size(-1)), dim=-1)
                # without the tail: renormalised over the k, their sum is one and the tail's 0
                logp = top.values if tail else torch.log_softmax(top.values, dim=-1)
                out[id(r)] = (top.indices.to(torch.int32).cpu(), logp.to(torch.float16).cpu())
    finally:
        model.train(was)
    return out


def train(
    job: TrainJob, *, progress: Callable[[dict[str, Any]], None] | None = None
) -> TrainResult:
    from transformers import AutoTokenizer

    s = job.settings
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    device = _device(s)
    on_gpu = device.type == "cuda"
    use_bf16 = on_gpu if s.bf16 is None else s.bf16
    amp = torch.bfloat16 if use_bf16 else None
    ckpt = s.gradient_checkpointing
    attention = s.attention or ("flex_attention" if on_gpu else "sdpa")
    if on_gpu and s.gpu_memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(s.gpu_memory_fraction, device)
    work = Path(job.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    if job.tokenized is not None:
        tokenized: list[Tokenized | None] = list(job.tokenized)
        fisher_basis: list[Tokenized] = list(job.tokenized)
        pad_id = job.pad_id
    else:
        tok = AutoTokenizer.from_pretrained(job.base_model)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        tokenized = [tokenize_chat(tok, m, s.max_len) for m in job.examples]
        fisher_basis = [
            t
            for t in (tokenize_chat(tok, m, s.max_len) for m in job.fisher_examples)
            if t is not None
        ]
    if s.replay_loss not in ("ce", "kl"):
        raise ValueError(f"replay_loss must be 'ce' or 'kl', not {s.replay_loss!r}")
    if s.replay_loss == "kl" and job.n_taught:
        tokenized = [
            replace(t, soft=True) if t is not None and i >= job.n_taught else t
            for i, t in enumerate(tokenized)
        ]
    kept = [t for t in tokenized if t is not None and t.n_target > 0]
    if not kept:
        raise ValueError("no example fits max_len: nothing to train on")
    taught = [t for t in tokenized[: job.n_taught] if t is not None and t.n_target > 0]
    taught_rows = pack(taught, s.max_len)
    rows = pack(kept, s.max_len)
    batch_rows = max(1, s.batch_tokens // s.max_len)
    total = plan_steps(len(rows), batch_rows, s)
    per_epoch = steps_per_epoch(len(rows), batch_rows)
    checks = check_steps(total, per_epoch, s) if taught_rows else set()

    model = load_model(
        job.base_model,
        settings=s.lora,
        warm_start=job.warm_start,
        dtype=torch.bfloat16 if use_bf16 else torch.float32,
        device=device,
        gradient_checkpointing=ckpt,
        attention=attention,
    )
    params = trainable(model)
    opt = torch.optim.AdamW(
        params.values(), lr=s.learning_rate, weight_decay=s.weight_decay, fused=on_gpu
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, s))
    pad_to = s.max_len if attention == "flex_attention" else None
    # Distillation targets from the model as it starts (the promoted version), before any
    # checkpoint is loaded: a resumed run fits the same targets as the run it resumes.
    teacher = (
        teacher_targets(
            model, rows, device, pad_id, amp, s.distill_top_k, pad_to, tail=s.distill_tail
        )
        if s.replay_loss == "kl"
        else None
    )
    loss_fn = _loss_fn(device, pad_id, amp, pad_to, teacher)

    fisher_s = fisher_start_s = 0.0
    # EWC: the promoted adapter's consolidated Fisher, anchored at its weights.
    fisher: dict[str, torch.Tensor] = {}
    anchor: dict[str, torch.Tensor] = {}
    if s.ewc_lambda > 0 and job.ewc_state is not None and Path(job.ewc_state).exists():
        f_prev, a_prev, _ = ewc.load_state(job.ewc_state)
        if set(f_prev) <= set(params) and all(f_prev[n].shape == params[n].shape for n in f_prev):
            fisher = {n: t.to(device, torch.float32) for n, t in f_prev.items()}
            anchor = {n: t.to(device, torch.float32) for n, t in a_prev.items()}
        else:
            log.warning("EWC state does not match this adapter's shape: EWC off for this run")
    elif s.ewc_lambda > 0 and fisher_basis:
        # First cycle: hold the adapter near "no change" where general data cares.
        tf = time.perf_counter()
        fisher = _estimate(model, fisher_basis, s, loss_fn, batch_rows, fisher_budget(total, s))
        fisher_start_s = time.perf_counter() - tf
        fisher_s += fisher_start_s
        anchor = {n: p.detach().float().clone() for n, p in params.items()}

    ckpt_dir = work / "checkpoints" / "latest"
    start = _load_checkpoint(ckpt_dir, model, opt, sched) if ckpt_dir.exists() else 0
    if start:
        log.info("resuming from step %d", start)
    data = _epochs(rows, batch_rows, s.seed)
    for _ in range(start):  # replay the data order up to the checkpoint
        next(data)

    log_path = work / "progress.jsonl"
    first_loss = final_loss = float("nan")
    tokens = 0
    ran = total
    stop = "steps" if s.steps is not None else "budget"
    fits: list[dict[str, float]] = []
    # The weights of the best check so far (CPU copies of the adapter: small): a run that ends
    # on its budget keeps them, not the last step's, which a late loss spike can undo.
    best: tuple[tuple[float, float, float], int, dict[str, torch.Tensor]] | None = None
    model.train()
    bar = _bar(total, start)
    t_loop = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log_file:
        for step in range(start, total):
            batch = next(data)
            task = loss_fn(model, batch)
            if job.nan_at_step is not None and step == job.nan_at_step:
                task = task * float("nan")
            if not torch.isfinite(task):
                raise NonFiniteLoss(
                    f"non-finite loss ({task.item()}) at step {step + 1} of {total}"
                )
            task.backward()
            # EWC's gradient goes straight into .grad: the same update as a loss term, no graph.
            penalty, ewc_scale = (
                ewc.add_capped_penalty_grad_(
                    params, anchor, fisher, s.ewc_lambda, max_share=s.ewc_max_share
                )
                if fisher and s.ewc_mode == "gradient"
                else (None, 1.0)
            )
            torch.nn.utils.clip_grad_norm_(params.values(), s.max_grad_norm)
            step_lr = float(opt.param_groups[0]["lr"])
            opt.step()
            if fisher and s.ewc_mode == "decoupled":
                penalty = ewc.pull_toward_anchor_(params, anchor, fisher, s.ewc_lambda, step_lr)
            loss = task.detach() + penalty if penalty is not None else task.detach()
            sched.step()
            opt.zero_grad(set_to_none=True)
            n_tok = sum(len(r) for r in batch)
            tokens += n_tok
            task_value = float(task.item())
            record: dict[str, Any] = {
                "step": step + 1,
                "loss": float(loss.item()),
                "task_loss": task_value,
                "ewc_penalty": float(penalty.item()) if penalty is not None else 0.0,
                "ewc_scale": round(ewc_scale, 4),
                "lr": sched.get_last_lr()[0],
                "tokens": n_tok,
                "elapsed_s": round(time.perf_counter() - t0, 3),
                "total": total,  # the step budget; the stopping rule may end the run sooner
                # this process's loop so far: its first step (after a resume, the checkpoint's)
                # and the time since, so a pace leaves out loading, the Fisher and restarts
                "loop_from": start,
                "loop_s": round(time.perf_counter() - t_loop, 3),
            }
            if step == start:
                first_loss = task_value
            final_loss = task_value
            if step + 1 in checks:
                f = taught_fit(model, taught_rows, device, pad_id, amp, batch_rows)
                fit = {"epoch": round((step + 1) / per_epoch, 2), "step": step + 1,
                       "token_accuracy": round(f.token_accuracy, 4), "exact": round(f.exact, 4),
                       "nll": round(f.nll, 4)}  # fmt: skip
                fits.append(fit)
                record["taught"] = fit
                key = (f.exact, f.token_accuracy, -f.nll)
                if best is None or key > best[0]:
                    best = (key, len(fits) - 1, {n: p.detach().cpu().clone()
                                                 for n, p in params.items()})  # fmt: skip
                log.info("after %s passes: %.0f%% of the taught answers exact, %.1f%% of their "
                         "tokens, NLL %.3f", fit["epoch"], 100 * f.exact, 100 * f.token_accuracy,
                         f.nll)  # fmt: skip
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if progress:
                progress(record)
            bar.update(1)
            bar.set_postfix(loss=f"{task_value:.3f}")
            if (
                fits
                and fits[-1]["step"] == step + 1
                and (fits[-1]["exact"] >= (s.stop_learned or 2.0))
            ):
                ran, stop = step + 1, "learned"
                break
            if s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and step + 1 < total:
                _save_checkpoint(ckpt_dir, model, opt, sched, step + 1)
            if _stop and step + 1 < total:
                _save_checkpoint(ckpt_dir, model, opt, sched, step + 1)
                raise Stopped(f"stopped after step {step + 1} of {total}; checkpoint written")
    bar.close()
    loop_s = time.perf_counter() - t_loop
    kept_check: dict[str, float] | None = None
    if stop == "budget" and best is not None and best[1] != len(fits) - 1:
        kept_check = fits[best[1]]
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best[2][n].to(p.device))
        log.info("budget spent: keeping the weights after %s passes (%.0f%% of the taught "
                 "answers exact), not the last pass's (%.0f%%)", kept_check["epoch"],
                 100 * kept_check["exact"], 100 * fits[-1]["exact"])  # fmt: skip
    best = None

    out = work / "adapter"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_adapter(model, out)
    # The Fisher of this cycle's data at the new weights, merged into the running one.
    if s.ewc_lambda > 0:
        tf = time.perf_counter()
        f_new = _estimate(model, kept, s, loss_fn, batch_rows, fisher_budget(total, s))
        fisher_s += time.perf_counter() - tf
        merged = ewc.consolidate(fisher or None, f_new, decay=s.ewc_decay)
        ewc.save_state(
            out / "ewc.safetensors",
            {n: t.cpu() for n, t in merged.items()},
            {n: p.detach().float().cpu() for n, p in trainable(model).items()},
            {"decay": str(s.ewc_decay), "estimator": "empirical-fisher-per-batch"},
        )
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return TrainResult(
        adapter_dir=out,
        steps=ran,
        planned_steps=total,
        epochs=round(ran / per_epoch, 2),
        stop=stop,
        taught_checks=fits,
        kept_check=kept_check,
        examples=len(kept),
        dropped_too_long=len(tokenized) - len(kept),
        rows=len(rows),
        tokens=tokens,
        target_tokens=sum(t.n_target for t in kept),
        seconds=round(time.perf_counter() - t0, 3),
        loop_seconds=round(loop_s, 3),
        fisher_seconds=round(fisher_s, 3),
        fisher_start_seconds=round(fisher_start_s, 3),
        peak_memory_bytes=torch.cuda.max_memory_allocated() if on_gpu else 0,
        first_loss=first_loss,
        final_loss=final_loss,
        resumed_from=start,
        ewc_lambda=s.ewc_lambda,
        device=str(device),
    )


def fisher_budget(total_steps: int, s: TrainSettings) -> int:
    """Batches per Fisher estimate: at most ``fisher_batches`` and about 4% of the run's steps,
    so estimation (at most twice a run) stays under a tenth of the training time."""
    return max(1, min(s.fisher_batches, int(0.04 * total_steps)))


def _estimate(
    model: Any,
    toks: Sequence[Tokenized],
    s: TrainSettings,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch_rows: int,
    budget: int,
) -> dict[str, torch.Tensor]:
    rows = pack(toks, s.max_len)
    groups = batches(rows, batch_rows, random.Random(s.seed + 7))
    # Max-normalised, so that lambda means the same from cycle to cycle and model to model
    # (the raw estimate scales with batch size and loss averaging).
    return ewc.normalize_fisher(ewc.estimate_fisher(model, groups, loss_fn, max_batches=budget))


def _bar(total: int, start: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", disable=None)
