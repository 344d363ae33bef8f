"""A tiny parent for the vLLM server: it makes sure no vLLM process outlives the daemon.

Usage: ``python -m serving._reaper PARENT_PID GRACE_S -- CMD ...``

* The kernel sends this process SIGTERM when the daemon dies, however it dies
  (SIGKILL included), through ``PR_SET_PDEATHSIG``.
* It runs CMD in its own process group (the daemon starts it as a session
  leader), so vLLM's engine workers are in that group too.
* On SIGTERM or SIGINT it sends SIGTERM to the whole group, waits GRACE_S
  seconds, then SIGKILLs the group.
* It exits with CMD's exit status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: fall back to polling below
        pass
    if os.getppid() != parent:  # the daemon died before prctl took effect
        sys.exit(1)


def _kill_group(grace: float, child: subprocess.Popen[bytes]) -> None:
    pgid = os.getpgid(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if child.poll() is not None and not _others_in_group(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)  # ends this process too


def _others_in_group(pgid: int) -> bool:
    me = os.getpid()
    try:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    except OSError:
        return False
    return False


def _status(code: int) -> int:
    """The shell's convention: a command killed by signal N exits 128 + N."""
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 2:
        print("usage: python -m serving._reaper PARENT_PID GRACE_S -- CMD ...", file=sys.stderr)
        return 2
    parent, grace = int(argv[0]), float(argv[1])
    cmd = argv[3:]
    _die_with_parent(parent)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(cmd)
    while True:
        if stopping or os.getppid() != parent:
            _kill_group(grace, child)
            return _status(child.wait())
        code = child.poll()
        if code is not None:
            # vLLM exited on its own: take any stragglers of the group with it.
            _kill_group(min(grace, 5.0), child)
            return _status(code)
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
