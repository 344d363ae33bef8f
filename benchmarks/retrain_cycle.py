"""Retrain one recorded cycle under variants of its settings, and measure what the gate measures.

A cycle's version folder keeps everything its training saw (``state/train.jsonl``, the replay
mix in ``state/replay.jsonl``, the parent adapter it warm-started from and that parent's EWC
state). This script runs that same job again with one setting changed at a time and reports,
for each variant, what the gate would see and what was taught:

* general: the change in NLL per token of the base model's own greedy answers to the gate's
  general prompts (the gate's default "general" check, computed here with transformers);
* taught: the share of the cycle's corrections whose answer is the model's most likely
  continuation at every token (teacher-forced), and the same for the earlier cycles' corrections
  (retention);
* held out: the mean NLL per token of the cycle's held-out corrections (never trained on).

Two steps, so the GPU side needs nothing but torch, transformers and peft:

    # here, from a data directory the learning benchmark (or a daemon) left behind
    .venv/bin/python benchmarks/retrain_cycle.py prepare DATA_DIR v0002 --to .bench/retrain
    # there (or here, on the CPU)
    python benchmarks/retrain_cycle.py run .bench/retrain --base MODEL_DIR \
        --out docs/results/retrain_cycle.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learners.replay import replay_counts  # noqa: E402

# name -> (what changes, TrainSettings overrides, replay transform)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "recorded": ("the recorded job (replay budget shared with earlier examples)", {}, "recorded"),
    "anchor-whole": (
        "self-replay keeps the whole budget, earlier examples on top (shipped)",
        {},
        "anchor-whole",
    ),
    "anchor-no-ewc": ("the shipped replay with EWC off", {"ewc_lambda": 0.0}, "anchor-whole"),
    "no-ewc": ("EWC off", {"ewc_lambda": 0.0}, "recorded"),
    "lr-half": ("learning rate halved", {"learning_rate": 5e-4}, "recorded"),
    "lr-quarter": ("learning rate quartered", {"learning_rate": 2.5e-4}, "recorded"),
    "no-past": ("no replay of earlier feedback", {}, "no-past"),
    "epochs+1": ("one more pass after the stop", {"min_epochs": 4.0}, "recorded"),
    "ewc-x5": ("EWC lambda x5", {"ewc_lambda": 5000.0}, "recorded"),
}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare(data_dir: Path, version: str, to: Path) -> None:
    """Gather a version's recorded job into ``to`` (runs where the daemon is installed)."""
    from daemon.candidate import train_settings
    from daemon.config import ReplaySettings, TrainingSettings
    from daemon.evaluation import GENERAL_PROMPTS

    vdir = data_dir / "adapters" / version
    manifest = json.loads((vdir / "manifest.json").read_text())
    parent = manifest["parent"]
    if not parent:
        raise SystemExit(f"{version} has no parent: pick a warm-started cycle")
    pdir = data_dir / "adapters" / parent
    training = TrainingSettings.model_validate(manifest["settings"]["training"])
    replay = ReplaySettings.model_validate(manifest["settings"]["replay"])
    settings = asdict(train_settings(training, replay))
    to.mkdir(parents=True, exist_ok=True)
    shutil.copytree(pdir, to / "parent", dirs_exist_ok=True, ignore=shutil.ignore_patterns("state"))
    shutil.copy2(pdir / "state" / "ewc.safetensors", to / "parent_ewc.safetensors")
    messages = lambda rows: [r["messages"] for r in rows]  # noqa: E731
    bundle = {
        "version": version,
        "parent": parent,
        "settings": settings,
        "replay_shares": {k: getattr(replay, f"{k}_share") for k in ("general", "self", "past")},
        "general_prompts": list(GENERAL_PROMPTS),
        "max_tokens": 128,
        "taught": messages(_jsonl(vdir / "state" / "train.jsonl")),
        "replay": _jsonl(vdir / "state" / "replay.jsonl"),
        "held_out": messages(_jsonl(vdir / "state" / "holdout.jsonl")),
        "earlier": messages(_jsonl(pdir / "state" / "train.jsonl")),
    }
    (to / "bundle.json").write_text(json.dumps(bundle, indent=1) + "\n")
    print(f"{version} (parent {parent}): {len(bundle['taught'])} taught, {len(bundle['replay'])} "
          f"replayed, {len(bundle['held_out'])} held out, {len(bundle['earlier'])} earlier -> {to}")  # fmt: skip


def replay_of(bundle: dict[str, Any], transform: str) -> tuple[list[Any], list[Any]]:
    """The replayed examples and the Fisher pool (the self examples, as the daemon's)."""
    rows = bundle["replay"]
    selfs = [r["messages"] for r in rows if r["source"] == "self"]
    past = [r["messages"] for r in rows if r["source"] == "past"]
    if transform == "no-past":
        chosen = selfs
    elif transform == "anchor-whole":  # as `daemon.candidate.build_replay` counts them now
        shares = bundle["replay_shares"]
        available = {"general": False, "self": bool(selfs), "past": bool(past)}
        counts = replay_counts(shares, available, len(rows))
        chosen = [selfs[i % len(selfs)] for i in range(counts["self"])] + past[: counts["past"]]
    else:
        chosen = [r["messages"] for r in rows]
    return chosen, selfs[:64]


class Scorer:
    def __init__(self, base: str, device: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(base)
        self.device = device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.base = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()

    def model(self, adapter: Path | None) -> Any:
        if adapter is None:
            return self.base
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base, str(adapter)).eval()

    def greedy(self, model: Any, prompts: list[str], max_tokens: int) -> list[str]:
        out = []
        for p in prompts:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tok(text, return_tensors="pt", add_special_tokens=False).to(self.device)
            with self.torch.no_grad():
                got = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            new = got[0, ids["input_ids"].shape[1] :]
            out.append(str(self.tok.decode(new, skip_special_tokens=True)))
        return out

    def fit(self, model: Any, chats: list[Any]) -> dict[str, float]:
        """Per answer: mean NLL per token and whether every token is the argmax."""
        from learners.data import answer_positions, tokenize_chat

        nlls, exact = [], []
        for chat in chats:
            t = tokenize_chat(self.tok, chat, 1024)
            if t is None:
                continue
            ids = self.torch.tensor([t.input_ids], device=self.device)
            with self.torch.no_grad():
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            pos = answer_positions(t)
            want = self.torch.tensor([t.input_ids[i] for i in pos], device=self.device)
            got = logp[[i - 1 for i in pos]]
            nlls.append(float(-got.gather(1, want[:, None]).mean()))
            exact.append(float(bool((got.argmax(-1) == want).all())))
        return {"nll": sum(nlls) / len(nlls), "exact": sum(exact) / len(exact), "n": len(nlls)}

    def measure(
        self, adapter: Path | None, bundle: dict[str, Any], reference: list[Any]
    ) -> dict[str, Any]:
        model = self.model(adapter)
        try:
            row = {
                "general_nll": self.fit(model, reference)["nll"],
                "taught": self.fit(model, bundle["taught"]),
                "earlier": self.fit(model, bundle["earlier"]),
                "held_out": self.fit(model, bundle["held_out"]) if bundle["held_out"] else None,
            }
        finally:
            if adapter is not None:
                model.unload()  # the base model again, unchanged
        return row


def run(bundle_dir: Path, base: str, out: Path, names: list[str], commit: str | None) -> None:
    import torch

    from learners.lora import LoraSettings
    from learners.train import TrainJob, TrainSettings, train

    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    raw = dict(bundle["settings"])
    raw["lora"] = LoraSettings(
        **{**raw["lora"], "target_modules": tuple(raw["lora"]["target_modules"])}
    )
    recorded = TrainSettings(**raw)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorer = Scorer(base, device)
    t0 = time.perf_counter()
    answers = scorer.greedy(scorer.base, bundle["general_prompts"], bundle["max_tokens"])
    reference = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        for p, a in zip(bundle["general_prompts"], answers, strict=True)
        if a.strip()
    ]
    rows: dict[str, Any] = {
        "base": {"what": "the base model", **scorer.measure(None, bundle, reference)},
        "parent": {"what": f"the parent {bundle['parent']}", **scorer.measure(bundle_dir / "parent", bundle, reference)},
    }  # fmt: skip
    print(
        f"reference answers and the two references in {time.perf_counter() - t0:.0f} s", flush=True
    )
    for name in names:
        what, overrides, transform = VARIANTS[name]
        replayed, fisher = replay_of(bundle, transform)
        work = bundle_dir / "work" / name
        shutil.rmtree(work, ignore_errors=True)
        job = TrainJob(
            base_model=base,
            work_dir=work,
            examples=[*bundle["taught"], *replayed],
            settings=replace(recorded, **overrides),
            warm_start=bundle_dir / "parent",
            ewc_state=bundle_dir / "parent_ewc.safetensors",
            fisher_examples=fisher,
            n_taught=len(bundle["taught"]),
        )
        t = time.perf_counter()
        result = train(job)
        row = scorer.measure(result.adapter_dir, bundle, reference)
        row.update(
            what=what,
            replayed=len(replayed),
            steps=result.steps,
            epochs=result.epochs,
            stop=result.stop,
            seconds=round(time.perf_counter() - t, 1),
        )
        rows[name] = row
        print(f"{name}: {row['steps']} steps, general {row['general_nll'] / rows['base']['general_nll'] - 1:+.1%}, "
              f"taught {row['taught']['exact']:.0%}, earlier {row['earlier']['exact']:.0%}", flush=True)  # fmt: skip
    base_nll = rows["base"]["general_nll"]
    for row in rows.values():
        row["general_change"] = row["general_nll"] / base_nll - 1
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    result_doc = {
        "benchmark": "retrain_cycle",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "version": bundle["version"],
        "parent": bundle["parent"],
        "n": {k: len(bundle[k]) for k in ("taught", "replay", "held_out", "earlier")},
        "reference_answers": len(reference),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result_doc, indent=2) + "\n")
    print_table(result_doc)
    print(f"\nwritten to {out}")


def print_table(doc: dict[str, Any]) -> None:
    n = doc["n"]
    print(f"\n{doc['version']} retrained from {doc['parent']} ({n['taught']} taught, {n['replay']} "
          f"replayed, {n['held_out']} held out), {doc['device']}, commit {doc['commit'][:7]}\n")  # fmt: skip
    head = f"{'variant':<12}{'steps':>6}{'general':>9}{'taught':>8}{'earlier':>9}{'held-out NLL':>14}  what"
    print(head)
    for name, r in doc["rows"].items():
        held = r["held_out"]["nll"] if r["held_out"] else math.nan
        print(f"{name:<12}{r.get('steps', ''):>6}{r['general_change']:>+9.1%}{r['taught']['exact']:>8.0%}"
              f"{r['earlier']['exact']:>9.0%}{held:>14.3f}  {r['what']}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("data_dir", type=Path)
    p.add_argument("version")
    p.add_argument("--to", type=Path, default=ROOT / ".bench" / "retrain")
    r = sub.add_parser("run")
    r.add_argument("bundle", type=Path)
    r.add_argument("--base", required=True)
    r.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "retrain_cycle.json")
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--commit", help="the commit measured (where the copy has no git history)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.data_dir, args.version, args.to)
    else:
        names = [v for v in args.variants.split(",") if v]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        run(args.bundle, args.base, args.out, names, args.commit)


if __name__ == "__main__":
    main()
