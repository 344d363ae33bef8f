"""Facts: which training recipe teaches the default model a cycle's corrections and keeps what it
knew? In-process, through the product's trainer, one arm per recipe, all on the same data.

The data is the learning benchmark's story (`benchmarks/story.py`): ``--facts`` made-up facts,
each corrected once (the correction is the fact; the question is one of its three wordings, as
curation keeps one interaction per correction), plus the self-replay a cycle mixes in: the
model's own answers, sampled at temperature 1 (``replay.self_max_tokens`` tokens at most), to
the everyday chats that got no feedback. Each arm trains a fresh adapter from the base model
on the facts plus ``replay.ratio`` x as many replayed examples (drawn by `learners.replay.mix`,
as `daemon.candidate` does), then:

* **taught**: the share of facts whose greedy answer (48 tokens) to the trained wording holds
  every key word (`story.answered`); **unseen**: the same for a wording never trained on;
* **general**: the gate's measure, the NLL per token of the base model's greedy answers
  (``evaluation.max_tokens``) to the evaluation's general prompts
  (`daemon.evaluation.GENERAL_PROMPTS`), relative to the base model's; the gate allows +2 %;
* **agree**: the share of those general prompts answered exactly as the base model does.

Arms (``--arms``) are named overrides of the shipped defaults (``defaults`` is none): see
``ARMS``. The ``sdft`` arm is self-distillation: each taught answer is the base model's own
greedy answer with the correction shown in context (``REWRITE``), where that answer still holds
the fact's key words, else the correction. Runs on a GPU (fp32 by default, as training on the CPU: ``--bf16`` to change) or on
the CPU (slow: a few minutes an arm).

    python benchmarks/facts.py --model smollm2            # or a .gguf / a model folder
    python benchmarks/facts.py --model tiny --facts 3 --arms defaults kl   # smoke run

Prints a line per arm and a table; writes ``docs/results/facts_<model>_<device>.json``
(``--out``).
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import random
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from forgetting import (
    WORK,
    Runner,
    _version,
    chat,
    device_slug,
    git_commit,
    log,
    product_defaults,
    resolve_model,
    slug,
    trim_answer,
)
from story import EVERYDAY, FACTS, answered

ROOT = Path(__file__).resolve().parent.parent
FACT_TOKENS = 48
TARGET_TAUGHT = 0.9
TARGET_GENERAL = 0.02

# Overrides of the shipped defaults, by arm. Keys: TrainSettings fields, plus "replay_ratio",
# "replay_min" (replay.min_examples), "self_max_tokens", "rank", "alpha", "targets" (LoRA target modules).
ARMS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ce": {"replay_loss": "ce"},
    "no-ewc": {"ewc_lambda": 0.0},
    "lr2e-3": {"learning_rate": 2e-3},
    "lr3e-3": {"learning_rate": 3e-3},
    "b1024": {"batch_tokens": 1024},
    "b1024-lr2e-3": {"batch_tokens": 1024, "learning_rate": 2e-3},
    "r1": {"replay_ratio": 1.0, "replay_min": 0},  # one per fact, without the floor
    "r5": {"replay_ratio": 5.0},
    "e20": {"max_epochs": 20.0},
    "lr2e-3-no-ewc": {"learning_rate": 2e-3, "ewc_lambda": 0.0},
    "lr2e-3-ewc-uncapped": {"learning_rate": 2e-3, "ewc_max_share": None},
    # distillation targets renormalised over the top k, with no tail bucket (before the fix)
    "no-tail": {"distill_tail": False},
    # self-distillation (SDFT, arXiv 2601.19897): the taught answer is the model's own
    # rewrite of its answer with the correction in context, not the correction itself
    "sdft": {"taught_from": "rewrite"},
}

# The in-context prompt of the "sdft" arm: the model is shown the correction and answers.
REWRITE = (
    "{question}\n\nA reliable source says: {correction}\n"
    "Answer the question in one sentence, using what the source says."
)


def general_prompts() -> list[str]:
    """`daemon.evaluation.GENERAL_PROMPTS`, read from the source where the daemon's
    dependencies are missing (a bare GPU image)."""
    try:
        from daemon.evaluation import GENERAL_PROMPTS

        return list(GENERAL_PROMPTS)
    except ImportError:
        tree = ast.parse((ROOT / "daemon" / "evaluation.py").read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == (
                "GENERAL_PROMPTS"
            ):
                return list(ast.literal_eval(node.value))  # type: ignore[arg-type]
        raise


def eval_max_tokens() -> int:
    try:
        from daemon.config import EvaluationSettings

        return int(EvaluationSettings.model_validate({}).max_tokens)
    except ImportError:
        return 128


def self_max_tokens() -> int:
    try:
        from daemon.config import ReplaySettings

        return int(ReplaySettings.model_validate({}).self_max_tokens)
    except ImportError:
        return 256


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from learners import replay as replay_lib
    from learners.lora import LoraSettings
    from learners.train import TrainJob, TrainSettings, train

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    shipped = product_defaults()
    model_dir, model_name = resolve_model(args.model)
    args.rank, args.alpha = shipped["rank"], shipped["alpha"]
    r = Runner(model_dir, args)
    if not args.bf16:
        r.autocast = lambda: __import__("contextlib").nullcontext()  # type: ignore[method-assign]
    device = torch.cuda.get_device_name() if r.on_gpu else "cpu"
    facts = list(range(args.facts))
    taught = [chat(FACTS[f].questions[f % 3], FACTS[f].text) for f in facts]
    probes = [chat(FACTS[f].questions[f % 3]) for f in facts]
    unseen = [chat(FACTS[f].unseen) for f in facts]
    general = [chat(p) for p in general_prompts()]
    everyday = [chat(p) for p in EVERYDAY]

    base = r.load(None)
    if not args.bf16:
        base = base.float()
    t0 = time.perf_counter()
    ref = [o for o, _ in r.generate(base, general, eval_max_tokens(), sample=False)]
    ref_chats = [
        [*g, {"role": "assistant", "content": o}] for g, o in zip(general, ref, strict=True)
    ]
    ref_seqs = r.answer_seqs(ref_chats)
    # Self-replay pools, one per answer length an arm asks for, all from the base model.
    pools: dict[int, list[list[dict[str, Any]]]] = {}
    lengths = {self_max_tokens()} | {
        int(a["self_max_tokens"]) for a in ARMS.values() if "self_max_tokens" in a
    }
    for k in sorted(lengths):
        outs = r.generate(base, everyday, k, sample=True, seed=args.seed)
        pools[k] = [
            [*p, {"role": "assistant", "content": trim_answer(o, cut)}]
            for p, (o, cut) in zip(everyday, outs, strict=True)
            if o.strip()
        ]
    # SDFT targets: the base model's greedy answers with the correction in context; where one
    # lost the fact's key words, the correction itself (the arm records how many)
    rewrites = r.generate(
        base,
        [chat(REWRITE.format(question=FACTS[f].questions[f % 3], correction=FACTS[f].text))
         for f in facts],
        FACT_TOKENS,
        sample=False,
    )  # fmt: skip
    rewritten = [
        chat(FACTS[f].questions[f % 3], o.strip())
        if answered(o, FACTS[f].keys) and not cut
        else taught[k]
        for k, (f, (o, cut)) in enumerate(zip(facts, rewrites, strict=True))
    ]
    base_nll = r.nll(base, ref_seqs)
    base_taught = [o for o, _ in r.generate(base, probes, FACT_TOKENS, sample=False)]
    log(f"base on {device}: general NLL {base_nll:.4f} ({time.perf_counter() - t0:.1f} s); "
        f"knows {sum(answered(o, FACTS[f].keys) for f, o in zip(facts, base_taught, strict=True))}"
        f" of {len(facts)} facts")  # fmt: skip
    del base
    r.release()

    results: dict[str, Any] = {
        "benchmark": "facts",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": args.commit or git_commit(),
        "device": device,
        "machine": platform.machine(),
        "model": model_name,
        "libraries": {p: _version(p) for p in ("torch", "transformers", "peft")},
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "facts": len(facts),
        "everyday": len(everyday),
        "general_prompts": len(general),
        "product_defaults": shipped,
        "base": {"general_nll": base_nll, "general_answers": ref[:3]},
        "arms": {},
    }
    work = WORK / "facts" / slug(model_name)
    for arm in args.arms:
        o = dict(ARMS[arm])
        own = rewritten if o.pop("taught_from", "correction") == "rewrite" else taught
        n_self = o.pop("self_max_tokens", self_max_tokens())
        ratio = o.pop("replay_ratio", shipped["replay_ratio"])
        replay_min = o.pop("replay_min", shipped["replay_min"])
        lora = LoraSettings(
            rank=o.pop("rank", shipped["rank"]),
            alpha=o.pop("alpha", shipped["alpha"]),
            dropout=shipped["dropout"],
            **({"target_modules": tuple(o.pop("targets"))} if "targets" in o else {}),
        )
        base_settings: dict[str, Any] = {
            "learning_rate": shipped["lr"],
            "schedule": shipped["schedule"],
            "warmup_ratio": shipped["warmup_ratio"],
            "min_epochs": shipped["epochs"],
            "max_epochs": shipped["max_epochs"],
            "stop_learned": shipped["stop_learned"],
            "min_steps": shipped["min_steps"],
            "max_steps": shipped["max_steps"],
            "batch_tokens": shipped["batch_tokens"],
            "max_len": shipped["max_len"],
            "ewc_lambda": shipped["ewc_lambda"],
            "ewc_decay": shipped["ewc_decay"],
            "ewc_max_share": shipped["ewc_max_share"],
            "replay_loss": shipped.get("replay_loss", "ce"),
        }
        base_settings.update(o)
        settings = TrainSettings(
            lora=lora, seed=args.seed, checkpoint_every=0, bf16=args.bf16, **base_settings
        )
        pool = pools[n_self]
        replayed = replay_lib.mix(
            {"self": pool},
            {"self": 1.0},
            replay_lib.replay_total(len(taught), ratio, replay_min),
            random.Random(args.seed),
        )
        job = TrainJob(
            base_model=str(model_dir),
            work_dir=work / arm,
            examples=own + [ex for _, ex in replayed],
            settings=settings,
            fisher_examples=pool[:64],
            n_taught=len(own),
        )
        shutil.rmtree(job.work_dir, ignore_errors=True)
        res = train(job)
        model = r.load(res.adapter_dir)
        if not args.bf16:
            model = model.float()
        got = [o for o, _ in r.generate(model, probes, FACT_TOKENS, sample=False)]
        got_unseen = [o for o, _ in r.generate(model, unseen, FACT_TOKENS, sample=False)]
        gen = [o for o, _ in r.generate(model, general, eval_max_tokens(), sample=False)]
        nll = r.nll(model, ref_seqs)
        del model
        r.release()
        ok = [answered(x, FACTS[f].keys) for f, x in zip(facts, got, strict=True)]
        ok_unseen = [answered(x, FACTS[f].keys) for f, x in zip(facts, got_unseen, strict=True)]
        row = {
            "overrides": ARMS[arm],
            "taught": sum(ok) / len(ok),
            "unseen": sum(ok_unseen) / len(ok_unseen),
            "general_nll": nll,
            "general_change": nll / base_nll - 1.0,
            "agree": sum(a.strip() == b.strip() for a, b in zip(gen, ref, strict=True)) / len(ref),
            "steps": res.steps,
            "planned_steps": res.planned_steps,
            "epochs": res.epochs,
            "stop": res.stop,
            "taught_checks": res.taught_checks,
            "tokens": res.tokens,
            "train_seconds": res.seconds,
            "replayed": len(replayed),
            "taught_rewritten": sum(a is not b for a, b in zip(own, taught, strict=True)),
            "samples": [
                {"fact": FACTS[f].text, "answer": x, "unseen": u}
                for f, x, u in list(zip(facts, got, got_unseen, strict=True))[:4]
            ],
            "general_samples": gen[:2],
        }
        results["arms"][arm] = row
        log(f"{arm:<12} taught {100 * row['taught']:5.1f} %  unseen {100 * row['unseen']:5.1f} %  "
            f"general {100 * row['general_change']:+6.2f} %  agree {100 * row['agree']:5.1f} %  "
            f"{res.steps:>3}/{res.planned_steps} steps ({res.stop}), {res.tokens} tokens, "
            f"{res.seconds:.1f} s")  # fmt: skip
        write(results, args)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return results


def default_out(results: dict[str, Any]) -> Path:
    dev = "cpu" if results["device"] == "cpu" else device_slug(results["device"])
    return ROOT / "docs" / "results" / f"facts_{slug(results['model'])}_{dev}.json"


def write(results: dict[str, Any], args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else default_out(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def print_table(results: dict[str, Any]) -> None:
    print(f"\nfacts: {results['model']} on {results['device']}, {results['precision']}, "
          f"{results['facts']} facts, commit {results['commit']}")  # fmt: skip
    print(f"targets: taught >= {100 * TARGET_TAUGHT:.0f} %, general NLL <= "
          f"+{100 * TARGET_GENERAL:.0f} % (base {results['base']['general_nll']:.4f})\n")  # fmt: skip
    head = f"{'arm':<12} {'taught':>7} {'unseen':>7} {'general':>8} {'agree':>6} {'steps':>6} {'stop':>8} {'tokens':>7}  met"
    print(head)
    print("-" * len(head))
    for arm, a in results["arms"].items():
        met = a["taught"] >= TARGET_TAUGHT and a["general_change"] <= TARGET_GENERAL
        print(f"{arm:<12} {100 * a['taught']:6.1f}% {100 * a['unseen']:6.1f}% "
              f"{100 * a['general_change']:+7.2f}% {100 * a['agree']:5.0f}% {a['steps']:>6} "
              f"{a['stop']:>8} {a['tokens']:>7}  {'yes' if met else 'no'}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--facts", type=int, default=12)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU); default fp32")
    p.add_argument("--out", default=None)
    p.add_argument("--commit", default=None, help="the commit to record (no git on the machine)")
    p.add_argument("--keep", action="store_true", help="keep the adapters")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--nll-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--general-tokens", type=int, default=256)
    args = p.parse_args()
    if not 2 <= args.facts <= len(FACTS):
        raise SystemExit(f"--facts: between 2 and {len(FACTS)}")
    results = run(args)
    write(results, args)
    print_table(results)


if __name__ == "__main__":
    main()
