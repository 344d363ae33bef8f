"""What the benchmarks that drive a real `adaptd serve` share: a port, the daemon's environment
(a tiny model's small settings, overridable, or the daemon's defaults), starting and stopping
it, percentiles, and memory read from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin-key"
INFER = "bench-inference-key"
HOST = "127.0.0.1"
# What the benchmarks' users ask about.
TOPICS = [
    "the weather", "my printer", "a train ticket", "the garden", "a birthday cake", "the river",
    "an old bicycle", "the museum", "a chess opening", "my laptop battery", "the library card",
    "a lost umbrella", "the coffee machine", "a mountain trail", "the parking permit",
    "a violin lesson", "the tax form", "a broken window", "the football match", "a tomato plant",
]  # fmt: skip

# Small enough for a tiny model on two CPU cores: short contexts, a rank-8 adapter, few steps.
TINY_SETTINGS = {
    "ADAPTD_SERVING__MAX_MODEL_LEN": "512",
    "ADAPTD_SERVING__MAX_LORA_RANK": "8",
    "ADAPTD_SERVING__MAX_LORAS": "2",
    "ADAPTD_TRAINING__RANK": "8",
    "ADAPTD_TRAINING__ALPHA": "16",
    "ADAPTD_TRAINING__LEARNING_RATE": "5e-3",
    "ADAPTD_TRAINING__MAX_LEN": "128",
    "ADAPTD_TRAINING__BATCH_TOKENS": "512",
    "ADAPTD_TRAINING__MIN_STEPS": "30",
    "ADAPTD_TRAINING__MAX_STEPS": "40",
    "ADAPTD_REPLAY__SELF_MAX_TOKENS": "16",
    "ADAPTD_REPLAY__MIN_EXAMPLES": "0",  # a tiny run's few examples replay at the ratio alone
    "ADAPTD_EVALUATION__MAX_TOKENS": "24",
    # a random-weight model's general text moves a lot with any adapter
    "ADAPTD_GATE__MAX_GENERAL_REGRESSION": "10",
    "ADAPTD_GATE__MIN_HOLDOUT": "2",
    "ADAPTD_SCHEDULE__ENABLED": "false",
}


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0-100) of ``xs``; NaN for none."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def daemon_env(*, tiny: bool = True, **settings: str) -> dict[str, str]:
    """This process's environment without its ADAPTD_ settings, plus the keys, the tiny
    model's settings (unless ``tiny`` is false: the daemon's defaults) and ``settings``
    (ADAPTD_... = value)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", ADAPTD_API_KEYS=INFER,
               ADAPTD_ADMIN_KEYS=ADMIN)  # fmt: skip
    if tiny:
        env.update(TINY_SETTINGS)
    env.update(settings)
    return env


def start_daemon(
    model: Path, data: Path, port: int, log_path: Path, *, tiny: bool = True, **settings: str
) -> subprocess.Popen[bytes]:
    """`adaptd serve` in a session of its own (so that `stop_daemon` can reach every child);
    ``tiny``: with `TINY_SETTINGS` (see `daemon_env`)."""
    cmd = [sys.executable, "-m", "daemon.cli", "serve", "--model", str(model), "--data-dir",
           str(data), "--port", str(port)]  # fmt: skip
    return subprocess.Popen(
        cmd, env=daemon_env(tiny=tiny, **settings), cwd=ROOT, stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"adaptd exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit("adaptd did not become ready")


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 60) -> int | None:
    """SIGTERM, then SIGKILL of the whole session if it has not exited in ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return proc.returncode


def rss_mib(pid: int) -> float:
    """Resident memory of one process, MiB (NaN once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tinymodel import build_tiny_model

    return build_tiny_model(work / "tiny-model")
