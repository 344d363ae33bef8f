"""`python -m serving._reaper PARENT GRACE -- CMD`: no process of the group outlives the parent.

Real processes throughout (the point is what the kernel does). Group members are read from
/proc; a zombie counts as gone (it holds no memory and no GPU; whether it is reaped depends on
the container's PID 1, not on the reaper).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

ROOT = Path(__file__).resolve().parents[2]
TWO_SLEEPERS = ["sh", "-c", "sleep 300 & sleep 300"]
IGNORES_TERM = ["sh", "-c", 'trap "" TERM; sleep 300 & sleep 300']

PARENT_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    pid_file, grace, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    reaper = subprocess.Popen(
        [sys.executable, "-m", "serving._reaper", str(os.getpid()), grace, "--", *cmd],
        start_new_session=True,
    )
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(reaper.pid))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(600)
    """
)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture()
def groups() -> Iterator[list[int]]:
    """Process groups started by a test; whatever is left is SIGKILLed afterwards."""
    started: list[int] = []
    yield started
    for pgid in started:
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def start_reaper(grace: float, cmd: list[str], groups: list[int]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving._reaper", str(os.getpid()), str(grace), "--", *cmd],
        start_new_session=True,
        env=env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    groups.append(proc.pid)
    return proc


def test_parent_killed_takes_the_whole_group(tmp_path: Path, groups: list[int]) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT, encoding="utf-8")
    pid_file = tmp_path / "reaper.pid"
    parent = subprocess.Popen(
        [sys.executable, str(script), str(pid_file), "5", *TWO_SLEEPERS],
        env=env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(pid_file.exists, 30, "the reaper's pid")
        reaper = int(pid_file.read_text())
        groups.append(reaper)
        # reaper + sh + two sleeps (or sh exec'ing the last one): grandchildren exist.
        wait_for(lambda: len(group_members(reaper)) >= 3, 30, "the reaper's children")
        assert os.getpgid(reaper) == reaper
        assert parent.pid not in group_members(reaper)

        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not group_members(reaper), 5, "every process of the group to end")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_sigterm_stops_the_group_and_the_reaper(groups: list[int]) -> None:
    reaper = start_reaper(30, TWO_SLEEPERS, groups)
    wait_for(lambda: len(group_members(reaper.pid)) >= 3, 30, "the reaper's children")
    t0 = time.monotonic()
    reaper.send_signal(signal.SIGTERM)
    reaper.wait(10)
    # The children obey SIGTERM: no waiting for the 30 s grace.
    assert time.monotonic() - t0 < 5
    wait_for(lambda: not group_members(reaper.pid), 5, "every process of the group to end")


def test_child_ignoring_sigterm_is_killed_after_grace(groups: list[int]) -> None:
    grace = 1.5
    reaper = start_reaper(grace, IGNORES_TERM, groups)
    wait_for(lambda: len(group_members(reaper.pid)) >= 3, 30, "the reaper's children")
    children = [p for p in group_members(reaper.pid) if p != reaper.pid]
    t0 = time.monotonic()
    reaper.send_signal(signal.SIGTERM)
    time.sleep(grace / 2)
    assert set(children) <= set(group_members(reaper.pid)), "SIGTERM should have been ignored"
    assert reaper.poll() is None, "the reaper must wait for the grace period"
    reaper.wait(grace + 10)
    assert time.monotonic() - t0 >= grace * 0.9
    wait_for(lambda: not group_members(reaper.pid), 5, "every process of the group to end")


def test_exits_with_the_commands_status_and_takes_stragglers(groups: list[int]) -> None:
    reaper = start_reaper(5, ["sh", "-c", "sleep 300 & sleep 0.5; exit 3"], groups)
    assert reaper.wait(20) == 3
    wait_for(lambda: not group_members(reaper.pid), 10, "the background sleep to be killed")


def test_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "serving._reaper", str(os.getpid()), "5", "sleep", "1"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "usage" in proc.stderr
