"""Training in a child process, so a crash or out-of-memory cannot take serving down.

The parent writes a job folder (`write_job`) and calls `run_job`, which starts
``python -m learners.run JOB_DIR`` and restarts it after a crash (it resumes from its last
checkpoint) up to ``max_restarts`` times. The child writes ``result.json``:
``{"ok": true, "result": {...}}`` or ``{"ok": false, "reason": "...", "kind": "non_finite"}``.

Exit status of the child: 0 done, 3 non-finite loss, 4 bad job, 5 stopped, 6 no room to write
(the disk, a quota or the file-size limit is full), anything else a crash. A child with no room
is not restarted: it would fail the same way. (Python ignores SIGXFSZ, so a file-size limit
shows up as EFBIG, like a full disk as ENOSPC.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from learners.data import Messages
from learners.lora import LoraSettings
from learners.train import NonFiniteLoss, TrainJob, TrainSettings

log = logging.getLogger(__name__)

EXIT_NON_FINITE = 3
EXIT_BAD_JOB = 4
EXIT_STOPPED = 5
EXIT_NO_ROOM = 6

# A write that failed for lack of room: disk full, quota exceeded, file-size limit.
_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_ROOM = (
    "training could not write its files: no room (the disk is full, or a quota or the "
    "file-size limit was reached); make room and start a cycle again"
)


def no_room(e: BaseException) -> bool:
    """Did a write fail for lack of room? An OSError carries its errno; safetensors (Rust)
    names it in its message as "(os error N)"."""
    if isinstance(e, OSError):
        return e.errno in _NO_ROOM_ERRNOS
    return any(f"(os error {n})" in str(e) for n in _NO_ROOM_ERRNOS)


_children: set[subprocess.Popen[bytes]] = set()
_stopping = False


def _die_with_parent() -> None:  # in the child, before exec
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan after SIGKILL


def spawn(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a learner child that gets SIGTERM when this process dies, however it dies."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    _children.add(proc)
    return proc


def stopping() -> bool:
    """True once `stop_children` was called: learner failures now mean "stopped"."""
    return _stopping


def stop_children(grace: float = 30.0) -> int:
    """Ask every learner child to stop at a safe point (SIGTERM: training checkpoints at the
    next step boundary and exits), wait up to ``grace`` seconds, then kill what is left; no
    restarts afterwards. Returns how many children were running."""
    global _stopping
    _stopping = True
    running = [p for p in list(_children) if p.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("learner child %d did not stop in %.0f s; killing it", proc.pid, grace)
            proc.kill()
            proc.wait()
    return len(running)


class TrainingFailed(RuntimeError):
    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class ChildOutcome:
    result: dict[str, Any]
    restarts: int


def _write_jsonl(path: Path, rows: Sequence[Messages]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for m in rows:
            f.write(json.dumps({"messages": [dict(x) for x in m]}, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[list[dict[str, Any]]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def write_job(job: TrainJob) -> Path:
    """Serialize a job into its work folder (settings as JSON, data as JSONL)."""
    work = Path(job.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    _write_jsonl(work / "examples.jsonl", job.examples)
    _write_jsonl(work / "fisher_examples.jsonl", job.fisher_examples)
    spec = {
        "base_model": job.base_model,
        "warm_start": str(job.warm_start) if job.warm_start else None,
        "ewc_state": str(job.ewc_state) if job.ewc_state else None,
        "nan_at_step": job.nan_at_step,
        "n_taught": job.n_taught,
        "settings": asdict(job.settings),
    }
    (work / "job.json").write_text(json.dumps(spec, indent=2) + "\n")
    return work


def read_job(work: Path) -> TrainJob:
    spec = json.loads((work / "job.json").read_text())
    st = dict(spec["settings"])
    lora = dict(st.pop("lora"))
    lora["target_modules"] = tuple(lora["target_modules"])
    return TrainJob(
        base_model=spec["base_model"],
        work_dir=work,
        examples=_read_jsonl(work / "examples.jsonl"),
        fisher_examples=_read_jsonl(work / "fisher_examples.jsonl"),
        settings=TrainSettings(lora=LoraSettings(**lora), **st),
        warm_start=Path(spec["warm_start"]) if spec["warm_start"] else None,
        ewc_state=Path(spec["ewc_state"]) if spec["ewc_state"] else None,
        nan_at_step=spec.get("nan_at_step"),
        n_taught=int(spec.get("n_taught", 0)),
    )


def run_job(
    work: Path,
    *,
    max_restarts: int = 2,
    env: dict[str, str] | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> ChildOutcome:
    """Run the job in a child; restart it after a crash (it resumes from its checkpoint)."""
    restarts = 0
    result_path = work / "result.json"
    result_path.unlink(missing_ok=True)
    while True:
        if _stopping:
            raise TrainingFailed("the daemon is stopping", "stopped")
        proc = spawn(["learners.run", str(work)], work / "child.log", env)
        if on_start:
            on_start(proc)
        try:
            code = proc.wait()
        finally:
            _children.discard(proc)
        if result_path.exists():
            outcome = json.loads(result_path.read_text())
            if outcome["ok"]:
                return ChildOutcome(outcome["result"], restarts)
            raise TrainingFailed(outcome["reason"], outcome.get("kind", "error"))
        if code == EXIT_STOPPED or _stopping:
            raise TrainingFailed("training was stopped at a step boundary", "stopped")
        if code in (EXIT_NON_FINITE, EXIT_BAD_JOB):
            raise TrainingFailed(f"training child exited with status {code}", "error")
        if code == EXIT_NO_ROOM:  # and no room for result.json either
            raise TrainingFailed(NO_ROOM, "no_room")
        if restarts >= max_restarts:
            # SIGKILL from no one we know of is most often the kernel's out-of-memory killer
            oom = (
                ": killed (SIGKILL), most likely out of memory; lower training.batch_tokens "
                "(or training.max_len)"
                if code == -9
                else ""
            )
            raise TrainingFailed(
                f"training crashed {restarts + 1} times (last exit status {code}{oom}"
                f"{_last_error(work / 'child.log')}); see {work / 'child.log'}",
                "crash",
            )
        restarts += 1
        log.warning("training child died (status %s); resuming, attempt %d", code, restarts + 1)
        time.sleep(1.0)


def _last_error(log_path: Path) -> str:
    """The last line of the child's log (a traceback's exception) as ": LINE", or nothing."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return f": {lines[-1][:300]}" if lines else ""


def _main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    work = Path(argv[0])
    out = work / "result.json"
    try:
        job = read_job(work)
    except (OSError, ValueError, KeyError, TypeError) as e:
        out.write_text(json.dumps({"ok": False, "reason": f"bad job: {e}", "kind": "bad_job"}))
        return EXIT_BAD_JOB
    import signal

    from learners.train import Stopped, request_stop, train

    signal.signal(signal.SIGTERM, lambda signum, frame: request_stop())
    try:
        result = train(job)
    except Stopped as e:
        out.write_text(json.dumps({"ok": False, "reason": str(e), "kind": "stopped"}))
        return EXIT_STOPPED
    except NonFiniteLoss as e:
        out.write_text(json.dumps({"ok": False, "reason": str(e), "kind": "non_finite"}))
        return EXIT_NON_FINITE
    except ValueError as e:
        out.write_text(json.dumps({"ok": False, "reason": str(e), "kind": "bad_job"}))
        return EXIT_BAD_JOB
    except Exception as e:
        if not no_room(e):
            raise
        reason = f"{NO_ROOM}: {e}"
        log.error("%s", reason)
        with contextlib.suppress(OSError):  # there may be no room for this either
            out.write_text(json.dumps({"ok": False, "reason": reason, "kind": "no_room"}))
        return EXIT_NO_ROOM
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ok": True, "result": result.to_dict()}))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
