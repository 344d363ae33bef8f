"""The learner on the tiny model, on the CPU: it learns, aborts on NaN, resumes after a kill,
and forgets less with replay and EWC."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from learners.data import IGNORE, Tokenized, pack, tokenize_chat
from learners.lora import LoraSettings
from learners.run import TrainingFailed, no_room, read_job, run_job, write_job
from learners.train import (
    NonFiniteLoss,
    TrainJob,
    TrainSettings,
    _loss_fn,
    check_steps,
    distill_sum,
    plan_steps,
    taught_fit,
    teacher_targets,
    train,
)

FACTS = [
    [
        {"role": "user", "content": f"What is the code word {i}?"},
        {"role": "assistant", "content": f"The code word {i} is zebra {i}."},
    ]
    for i in range(8)
]
GENERAL_PROMPTS = [
    "Hello!",
    "What is the capital of France?",
    "Tell me about the river.",
    "Please help me.",
    "Who reads a book?",
    "What is 3 plus 3?",
]
HELD_OUT = [
    "The teacher walks to the river.",
    "Thank you for your question.",
    "My friend cooks dinner.",
    "What is the capital of Spain?",
]

FAST = TrainSettings(
    lora=LoraSettings(rank=8, alpha=16, dropout=0.0),
    learning_rate=5e-3,
    max_len=128,
    batch_tokens=256,
    min_steps=12,
    seed=0,
)


def sampled_answers(
    model_dir: Path, prompts: list[str], *, per_prompt: int = 3, n: int = 16, seed: int = 0
) -> list[list[dict[str, str]]]:
    """Self-replay data: the base model's own *sampled* answers (temperature 1).

    Sampled, not greedy: training on a model's own samples has zero expected gradient at that
    model, so it anchors the output distribution; greedy answers would sharpen it instead.
    """
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        for _ in range(per_prompt):
            with torch.no_grad():
                gen = model.generate(
                    **ids, max_new_tokens=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0
                )
            text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            out.append([{"role": "user", "content": p}, {"role": "assistant", "content": text}])
    return out


def kl_from_base(base, model, tok, convs) -> float:  # type: ignore[no-untyped-def]
    """Mean KL(base || model) of the next-token distributions over whole conversations."""
    vals = []
    for c in convs:
        ids = tok.apply_chat_template(c, tokenize=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
        with torch.no_grad():
            lp_base = torch.log_softmax(base(input_ids=ids).logits.float(), -1)
            lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        vals.append((lp_base.exp() * (lp_base - lp)).sum(-1).mean())
    return float(torch.stack(vals).mean())


def test_a_run_lowers_the_loss_and_writes_a_peft_adapter(tiny_model: Path, tmp_path: Path) -> None:
    r = train(
        TrainJob(base_model=str(tiny_model), work_dir=tmp_path, examples=FACTS, settings=FAST)
    )
    assert r.final_loss < r.first_loss * 0.8
    files = sorted(p.name for p in r.adapter_dir.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((r.adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and set(cfg["target_modules"]) >= {"q_proj", "down_proj"}
    log = [json.loads(x) for x in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, r.steps + 1))
    # Deterministic for a seed.
    r2 = train(
        TrainJob(
            base_model=str(tiny_model), work_dir=tmp_path / "again", examples=FACTS, settings=FAST
        )
    )
    assert r2.final_loss == pytest.approx(r.final_loss, rel=1e-5)


@pytest.mark.parametrize(
    ("rows", "batch_rows", "kw", "total", "checks"),
    [
        # 10 rows, 4 a step: 3 steps a pass; 12 passes at most; looks from pass 2 on
        (10, 4, {}, 36, {6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36}),
        (10, 4, {"steps": 7}, 7, set()),  # exact steps: no stopping rule
        (10, 4, {"stop_learned": None}, 36, set()),
        (10, 4, {"max_steps": 20}, 20, {6, 9, 12, 15, 18, 20}),
        (1, 4, {"min_steps": 5, "max_epochs": 3}, 5, {5}),
    ],
)  # fmt: skip
def test_the_budget_follows_the_data(
    rows: int, batch_rows: int, kw: dict[str, object], total: int, checks: set[int]
) -> None:
    s = TrainSettings(**kw)  # type: ignore[arg-type]
    assert plan_steps(rows, batch_rows, s) == total
    per_epoch = -(-rows // batch_rows)
    assert check_steps(total, per_epoch, s) == checks


def test_training_stops_once_the_taught_answers_are_learned(
    tiny_model: Path, tmp_path: Path
) -> None:
    settings = TrainSettings(**{**FAST.__dict__, "min_steps": 1, "learning_rate": 5e-3,
                                "stop_learned": 0.5, "max_epochs": 60})  # fmt: skip
    r = train(
        TrainJob(base_model=str(tiny_model), work_dir=tmp_path, examples=FACTS,
                 settings=settings, n_taught=len(FACTS))
    )  # fmt: skip
    assert r.stop == "learned", r.taught_checks
    assert r.steps < r.planned_steps
    assert r.taught_checks[-1]["exact"] >= 0.5
    assert r.taught_checks[0]["epoch"] == 2.0  # not before min_epochs
    log = [json.loads(x) for x in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == r.steps and log[-1]["taught"] == r.taught_checks[-1]


class _Oracle(torch.nn.Module):
    """A stand-in language model for `taught_fit`: its most likely next token is ``next_of``
    of the current token (a fake: the code under test is the counting around the model)."""

    def __init__(self, next_of: dict[int, int], vocab: int = 16) -> None:
        super().__init__()
        self.next_of, self.vocab = next_of, vocab

    def forward(self, input_ids, position_ids=None, use_cache=False):  # type: ignore[no-untyped-def]
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for (i, j), t in zip(torch.cartesian_prod(*map(torch.arange, input_ids.shape)),
                             input_ids.flatten(), strict=True):  # fmt: skip
            logits[i, j, self.next_of.get(int(t), 0)] = 5.0
        return type("Out", (), {"logits": logits})()


def test_the_fit_counts_an_answer_learned_only_when_every_token_is() -> None:
    # two answers packed in one row and one in another: 1 -> 2 -> 3 is right throughout,
    # 4 -> 5 -> 6 misses its last token (the model says 7), 8 -> 9 is right
    rows = pack(
        [Tokenized([1, 2, 3], [IGNORE, 2, 3]), Tokenized([4, 5, 6], [IGNORE, 5, 6]),
         Tokenized([8, 9], [IGNORE, 9])],
        max_len=6,
    )  # fmt: skip
    assert len(rows) == 2
    model = _Oracle({1: 2, 2: 3, 4: 5, 5: 7, 8: 9})
    fit = taught_fit(model, rows, torch.device("cpu"), 0, None, batch_rows=2)
    assert fit.exact == pytest.approx(2 / 3)
    assert fit.token_accuracy == pytest.approx(4 / 5)
    assert fit.nll > 0


def test_the_distillation_loss_is_the_cross_entropy_to_the_teachers_top_k_and_tail(
    tiny_model: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    soft = replace(tokenize_chat(tok, FACTS[0], 128), soft=True)  # type: ignore[arg-type]
    hard = tokenize_chat(tok, FACTS[1], 128)
    assert hard is not None
    rows = pack([soft, hard], 256)
    teacher = teacher_targets(model, rows, torch.device("cpu"), 0, None, top_k=4)
    ids, logp = teacher[id(rows[0])]
    assert ids.shape == (soft.n_target, 4)
    # by hand, from the full logits of the soft example alone
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([soft.input_ids])).logits[0, :-1].float()
    at = torch.tensor([lab != IGNORE for lab in soft.labels[1:]])
    lp_s = torch.log_softmax(logits[at], -1)
    top = lp_s.topk(4, dim=-1)
    q = top.values.exp()  # the teacher's own probabilities, not renormalised over the 4
    assert torch.equal(ids.long(), top.indices)
    assert torch.allclose(logp.float().exp(), q, atol=2e-3)
    rest = 1 - q.sum(-1)  # the tail's mass, fitted as one more bucket
    soft_sum = -(q * top.values).sum() - (rest * torch.log(rest)).sum()
    with torch.no_grad():
        hl = model(input_ids=torch.tensor([hard.input_ids])).logits[0, :-1].float()
    hat = torch.tensor([lab != IGNORE for lab in hard.labels[1:]])
    hard_sum = torch.nn.functional.cross_entropy(
        hl[hat], torch.tensor(hard.labels[1:])[hat], reduction="sum"
    )
    expected = (soft_sum + hard_sum) / (soft.n_target + hard.n_target)
    with torch.no_grad():
        loss = _loss_fn(torch.device("cpu"), 0, None, None, teacher)(model, rows)
        # without targets the same rows are plain cross-entropy on every answer token
        ce = _loss_fn(torch.device("cpu"), 0, None, None, None)(model, rows)
    assert float(loss) == pytest.approx(float(expected), rel=2e-3)
    assert float(ce) != pytest.approx(float(loss), rel=1e-3)


def test_distillation_is_best_fitted_by_the_teacher_itself_not_a_sharper_student() -> None:
    # a teacher spread over 50 tokens, 4 of them kept: the student that matches the teacher
    # must score better than one that moved the tail's mass onto the 4 (top-k renormalised)
    torch.manual_seed(0)
    teacher = torch.randn(6, 50) * 2
    logp_full = torch.log_softmax(teacher, -1)
    top = logp_full.topk(4, dim=-1)
    sharp = torch.full_like(teacher, -30.0).scatter(-1, top.indices, top.values)
    matched = distill_sum(teacher, top.indices, top.values)
    sharpened = distill_sum(sharp, top.indices, top.values)
    assert float(matched) < float(sharpened)
    # and the teacher is the minimum: its gradient there is zero
    x = teacher.clone().requires_grad_(True)
    distill_sum(x, top.indices, top.values).backward()
    assert x.grad is not None and float(x.grad.abs().max()) < 1e-5


def test_nan_aborts_and_leaves_no_adapter(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLoss, match="step 3"):
        train(
            TrainJob(
                base_model=str(tiny_model),
                work_dir=tmp_path,
                examples=FACTS,
                settings=FAST,
                nan_at_step=2,
            )
        )
    assert not (tmp_path / "adapter").exists()
    write_job(
        TrainJob(
            base_model=str(tiny_model),
            work_dir=tmp_path / "child",
            examples=FACTS,
            settings=FAST,
            nan_at_step=0,
        )
    )
    with pytest.raises(TrainingFailed) as e:
        run_job(tmp_path / "child")
    assert e.value.kind == "non_finite"
    assert not (tmp_path / "child" / "adapter").exists()


def test_the_child_resumes_from_its_checkpoint_after_a_kill(
    tiny_model: Path, tmp_path: Path
) -> None:
    settings = TrainSettings(**{**FAST.__dict__, "steps": 40, "checkpoint_every": 5})
    work = write_job(
        TrainJob(base_model=str(tiny_model), work_dir=tmp_path, examples=FACTS, settings=settings)
    )
    killed = []

    def kill_after_checkpoint(proc) -> None:  # type: ignore[no-untyped-def]
        if killed:
            return
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (work / "checkpoints" / "latest").exists():
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        killed.append(True)

    outcome = run_job(work, on_start=kill_after_checkpoint)
    assert outcome.restarts == 1
    assert outcome.result["resumed_from"] >= 5
    steps = [json.loads(x)["step"] for x in (work / "progress.jsonl").read_text().splitlines()]
    assert steps[-1] == 40
    # Same final loss as an uninterrupted run: resuming restores weights, optimizer and data order.
    clean = train(
        TrainJob(
            base_model=str(tiny_model),
            work_dir=tmp_path / "clean",
            examples=FACTS,
            settings=settings,
        )
    )
    assert outcome.result["final_loss"] == pytest.approx(clean.final_loss, rel=1e-3)


def test_replay_and_ewc_drift_less_from_the_base_on_held_out_prompts(
    tiny_model: Path, tmp_path: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    replay = sampled_answers(tiny_model, GENERAL_PROMPTS, seed=1)
    held_out = sampled_answers(tiny_model, HELD_OUT, per_prompt=1, seed=2)
    settings = TrainSettings(**{**FAST.__dict__, "steps": 30, "learning_rate": 1e-2})

    def drift(examples, lam: float, name: str, mode: str = "gradient") -> float:  # type: ignore[no-untyped-def]
        s = TrainSettings(**{**settings.__dict__, "ewc_lambda": lam, "ewc_mode": mode})
        r = train(
            TrainJob(
                base_model=str(tiny_model),
                work_dir=tmp_path / name,
                examples=examples,
                settings=s,
                fisher_examples=replay,
                n_taught=len(FACTS),
            )
        )
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
            str(r.adapter_dir),
        ).eval()
        return kl_from_base(base, model, tok, held_out)

    plain = drift(FACTS, 0.0, "plain")
    replayed = drift(FACTS + replay, 0.0, "replay")
    # EWC as shipped: its gradient capped at half the task gradient's length
    protected = drift(FACTS + replay, 1000.0, "protected")
    # decoupled: pulled toward the anchor after each step, in proportion to the Fisher
    pulled = drift(FACTS + replay, 1000.0, "pulled", mode="decoupled")
    assert plain > 0.01  # the plain run really moved the model (else the comparison is empty)
    # deterministic on the CPU (seeded): measured 0.0594, 0.0543, 0.0533
    assert replayed < plain * 0.97, (plain, replayed)
    assert protected < replayed, (replayed, protected)
    assert pulled < replayed, (replayed, pulled)
    # Replay by distillation (the shipped replay.loss) is not compared here: on this random
    # model every next-token distribution is near uniform, so its top 32 hold a few percent of
    # the mass and the drift says nothing of a trained model's. Its fit is tested above
    # (`distill_sum`) and its effect measured on SmolLM2 (docs/benchmarks.md, "Distillation's
    # tail").


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(28, "No space left on device"), True),
        (OSError(122, "Disk quota exceeded"), True),
        (OSError(27, "File too large"), True),
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
        (OSError(5, "Input/output error"), False),
        (RuntimeError("CUDA out of memory"), False),
    ],
)  # fmt: skip
def test_no_room_tells_a_full_disk_from_other_failures(
    error: BaseException, expected: bool
) -> None:
    assert no_room(error) is expected


def test_a_child_with_no_room_to_write_is_not_restarted(tiny_model: Path, tmp_path: Path) -> None:
    """A real file-size limit on the child (RLIMIT_FSIZE, as a full disk): its adapter (128 KiB)
    does not fit. It used to be restarted twice to fail the same way, with only an exit status
    for a reason."""
    import resource

    work = write_job(
        TrainJob(base_model=str(tiny_model), work_dir=tmp_path, examples=FACTS, settings=FAST)
    )
    spawned = []

    def limit(proc) -> None:  # type: ignore[no-untyped-def]
        spawned.append(proc.pid)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY))

    with pytest.raises(TrainingFailed, match=r"could not write its files.*File too large") as e:
        run_job(work, on_start=limit)
    assert e.value.kind == "no_room" and len(spawned) == 1


def test_a_job_reaches_the_child_whole(tmp_path: Path) -> None:
    """Every field of a job survives the trip to the training child (a field left out of
    job.json once turned the stopping rule and replay by distillation off in every cycle)."""
    from dataclasses import fields

    job = TrainJob(
        base_model="some/model",
        work_dir=tmp_path / "w",
        examples=FACTS[:2],
        settings=TrainSettings(**{**FAST.__dict__, "replay_loss": "kl", "stop_learned": 0.8}),
        warm_start=tmp_path / "parent",
        ewc_state=tmp_path / "parent" / "ewc.safetensors",
        fisher_examples=FACTS[2:3],
        nan_at_step=3,
        n_taught=1,
    )
    got = read_job(write_job(job))
    in_process_only = {"tokenized", "pad_id"}  # benchmarks on random-weight models, never sent
    for f in fields(TrainJob):
        if f.name in in_process_only:
            continue
        want, have = getattr(job, f.name), getattr(got, f.name)
        if f.name in ("examples", "fisher_examples"):
            want, have = [list(map(dict, m)) for m in want], [list(map(dict, m)) for m in have]
        assert have == want, f.name


def test_a_run_that_spends_its_budget_keeps_the_weights_of_its_best_check(
    tiny_model: Path, tmp_path: Path
) -> None:
    """At a learning rate far too high the taught answers get better, then worse again; the
    budget ends with the last check below the best one, and the adapter written is the one of
    the best check: the same weights as a run stopped at that pass (same seed, constant rate,
    no dropout: every step of the two runs up to there is the same)."""
    settings = replace(FAST, min_steps=1, learning_rate=0.04, warmup_ratio=0.0,
                       schedule="constant", stop_learned=1.0, min_epochs=1, max_epochs=10)  # fmt: skip
    job = TrainJob(base_model=str(tiny_model), work_dir=tmp_path / "long", examples=FACTS,
                   settings=settings, n_taught=len(FACTS))  # fmt: skip
    r = train(job)
    assert r.stop == "budget", r.taught_checks
    keys = [(c["exact"], c["token_accuracy"], -c["nll"]) for c in r.taught_checks]
    best = keys.index(max(keys))
    assert best < len(keys) - 1, r.taught_checks  # the situation this test is about
    assert r.kept_check == r.taught_checks[best]
    short = train(replace(job, work_dir=tmp_path / "short",
                          settings=replace(settings, max_epochs=r.kept_check["epoch"])))  # fmt: skip
    assert short.kept_check is None and short.taught_checks[-1] == r.kept_check
    a = load_file(r.adapter_dir / "adapter_model.safetensors")
    b = load_file(short.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
