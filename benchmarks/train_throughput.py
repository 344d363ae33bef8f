"""Training throughput and memory: adaptd's learner against transformers `Trainer` + PEFT.

Same model shape (random weights), same data (lengths uniform in 64-1024 tokens, the last 40%
of each example is the answer and carries the loss), same LoRA (rank 16, alpha 32, all linear
layers), about the same tokens per optimizer step, bf16 on one GPU. Each arm runs in its own
process so peak memory is its own.

    python benchmarks/train_throughput.py [--shapes smollm2-135m qwen3-1.7b] [--steps 30]

Arms:
* ``trainer``: `transformers.Trainer` + `peft.get_peft_model`, per-device batch 8, padded to
  the longest example in the batch, bf16, defaults otherwise (the baseline);
* ``ours``: `learners.train.train` as it runs on a GPU (packed rows, flex attention with a
  block-sparse mask that skips the blocks between examples, logits only on answer tokens,
  fused AdamW), gradient checkpointing off;
* ``ours-sdpa``: the same with SDPA and a dense block-diagonal mask instead of flex attention;
* ``ours-ckpt``: ``ours`` with gradient checkpointing (off by default, for a shared card);
* ``ours-ewc``: ``ours`` with EWC on (Fisher estimated at the start and the end; penalty every
  step), for the EWC cost targets.

Reports non-padding tokens/s over the steps after warm-up, peak GPU memory, and model-FLOPs
utilisation as 4 * N * tokens/s over the GPU's dense bf16 peak (LoRA: forward 2N, backward
through activations 2N, no weight gradients for the frozen base). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "qwen3-1.7b": dict(
        arch="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        tie_word_embeddings=True, max_position_embeddings=8192,
    ),
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
WARMUP = 5
BATCH = 8


def peak_flops() -> float:
    import torch

    name = torch.cuda.get_device_name()
    for key, value in BF16_PEAK.items():
        if key in name:
            return value
    return float("nan")


def make_data(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(64, 1024)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        cut = int(length * 0.6)
        out.append((ids, [-100] * cut + ids[cut:]))
    return out


def build_model(shape: str, path: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cfg_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    )
    torch.manual_seed(0)
    config = cfg_cls(**spec, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = model_cls(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    if not (path / "config.json").exists():
        model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return n


def run_trainer(model_dir: Path, data: list, steps: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    counted: list[int] = []

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        lab = torch.full((len(batch), n), -100, dtype=torch.long)
        att = torch.zeros(len(batch), n, dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            lab[i, :k] = torch.tensor(b["labels"])
            att[i, :k] = 1
        counted.append(int(att.sum()))
        return {"input_ids": ids, "labels": lab, "attention_mask": att}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(Path(tempfile.gettempdir()) / "trainer-out"), per_device_train_batch_size=BATCH, max_steps=steps,
        bf16=True, learning_rate=2e-4, logging_steps=10_000, save_strategy="no", report_to=[],
        dataloader_num_workers=0, remove_unused_columns=False, seed=0,
    )  # fmt: skip
    rows = [{"input_ids": i, "labels": lab} for i, lab in data]
    torch.cuda.reset_peak_memory_stats()
    Trainer(
        model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()]
    ).train()
    tokens = sum(counted[WARMUP + 1 : steps])  # batches of the timed steps
    return {
        "tokens_per_s": tokens / (times[-1] - times[WARMUP]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "steps": steps,
        "tokens_per_step": tokens / (steps - WARMUP - 1),
    }


def run_ours(
    model_dir: Path, data: list, steps: int, *, ckpt: bool, ewc: bool, attention: str
) -> dict[str, Any]:
    import torch

    from learners.data import Tokenized
    from learners.lora import LoraSettings
    from learners.train import TrainJob, TrainSettings, train

    stamps: list[tuple[float, int, float]] = []

    def progress(rec: dict[str, Any]) -> None:
        stamps.append((time.perf_counter(), rec["tokens"], rec["ewc_penalty"]))

    settings = TrainSettings(
        lora=LoraSettings(rank=16, alpha=32, dropout=0.05), steps=steps, max_len=2048,
        batch_tokens=4096, gradient_checkpointing=ckpt, bf16=True, checkpoint_every=0,
        ewc_lambda=1000.0 if ewc else 0.0, fisher_batches=16, attention=attention,
    )  # fmt: skip
    toks = [Tokenized(i, lab) for i, lab in data]
    torch.cuda.reset_peak_memory_stats()
    r = train(
        TrainJob(
            base_model=str(model_dir),
            work_dir=Path(tempfile.gettempdir()) / f"ours-{os.getpid()}",
            examples=(),
            tokenized=toks,
            settings=settings,
        ),
        progress=progress,
    )
    timed = stamps[WARMUP:]
    tokens = sum(t for _, t, _ in timed[1:])
    step_s = (timed[-1][0] - timed[0][0]) / (len(timed) - 1)
    return {
        "tokens_per_s": tokens / (timed[-1][0] - timed[0][0]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "steps": steps,
        "tokens_per_step": tokens / (len(timed) - 1),
        "step_s": step_s,
        "loop_s": r.loop_seconds,
        "fisher_s": r.fisher_seconds,
        "fisher_start_s": r.fisher_start_seconds,
        "ewc_penalty_last": timed[-1][2],
    }


def child(args: argparse.Namespace) -> None:
    model_dir = Path(args.model_dir)
    spec = SHAPES[args.shape]
    data = make_data(args.examples, spec["vocab_size"])
    if args.arm == "trainer":
        out = run_trainer(model_dir, data, args.steps)
    else:
        out = run_ours(
            model_dir, data, args.steps, ckpt=args.arm.endswith("-ckpt"),
            ewc=args.arm.endswith("-ewc"),
            attention="sdpa" if args.arm == "ours-sdpa" else "flex_attention",
        )  # fmt: skip
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument(
        "--arms", nargs="+", default=["trainer", "ours-sdpa", "ours", "ours-ckpt", "ours-ewc"]
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=600)
    ap.add_argument("--out", default=str(ROOT / "docs/results/train_throughput.json"))
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--arm")
    ap.add_argument("--shape")
    ap.add_argument("--model-dir")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import torch

    device = torch.cuda.get_device_name()
    results: dict[str, Any] = {"device": device, "torch": torch.__version__, "shapes": {}}
    for shape in args.shapes:
        model_dir = Path(tempfile.gettempdir()) / "bench-models" / shape
        n_params = build_model(shape, model_dir)
        per: dict[str, Any] = {"params": n_params}
        for arm in args.arms:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--arm",
                arm,
                "--shape",
                shape,
                "--model-dir",
                str(model_dir),
                "--steps",
                str(args.steps),
                "--examples",
                str(args.examples),
            ]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                per[arm] = {"error": (proc.stderr or proc.stdout)[-1500:]}
                print(f"{shape} {arm}: FAILED\n{per[arm]['error']}", flush=True)
                continue
            r = json.loads(line[0][7:])
            r["mfu"] = 4 * n_params * r["tokens_per_s"] / peak_flops()
            r["wall_s"] = round(time.time() - t0, 1)
            per[arm] = r
            print(
                f"{shape:<14}{arm:<11}{r['tokens_per_s']:>10.0f} tok/s {r['peak_gib']:>7.1f} GiB  MFU {r['mfu']:6.1%}",
                flush=True,
            )
        results["shapes"][shape] = per
    print(
        f"\n{device}; LoRA r=16 all linear, bf16, lengths 64-1024, {args.steps} steps ({WARMUP} warm-up)\n"
    )
    print(f"{'shape':<14}{'arm':<11}{'tok/s':>9}{'x base':>8}{'GiB':>7}{'x base':>8}{'MFU':>7}")
    for shape, per in results["shapes"].items():
        base = per.get("trainer", {})
        for arm, r in per.items():
            if not isinstance(r, dict) or "tokens_per_s" not in r:
                continue
            tr = (
                r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else float("nan")
            )
            mr = r["peak_gib"] / base["peak_gib"] if "peak_gib" in base else float("nan")
            r["vs_trainer"] = {"tokens_per_s": tr, "peak_memory": mr}
            print(
                f"{shape:<14}{arm:<11}{r['tokens_per_s']:>9.0f}{tr:>7.2f}x{r['peak_gib']:>7.1f}{mr:>7.2f}x{r['mfu']:>7.1%}"
            )
        ewc, plain = per.get("ours-ewc", {}), per.get("ours", {})  # same attention, EWC on/off
        if "step_s" in ewc and "step_s" in plain:
            per["ewc_cost"] = {
                "step_time_ratio": ewc["step_s"] / plain["step_s"],
                # Every cycle estimates once, at the end of its run; the first cycle also at the
                # start, where the first attention kernels are compiled.
                "fisher_share_of_training": (ewc["fisher_s"] - ewc["fisher_start_s"])
                / ewc["loop_s"],
                "first_cycle_fisher_share": ewc["fisher_s"] / ewc["loop_s"],
            }
            c = per["ewc_cost"]
            print(
                f"{shape:<14}EWC: step time x{c['step_time_ratio']:.3f}, Fisher "
                f"{c['fisher_share_of_training']:.1%} of training time "
                f"({c['first_cycle_fisher_share']:.1%} in a first cycle)"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], Path(args.out).name).write_text(
            json.dumps(results, indent=2) + "\n"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
