"""The README's Quick start, as a newcomer runs it: `make serve` on a fresh data directory, one
chat and one feedback with the official `openai` client (the README's own snippet), then a
clean stop. Exit status 0 only when every step worked; otherwise one line saying which step
failed and why, with the tail of the server's output.

    .venv/bin/python .ci/quickstart.py          # from the repository root; needs port 8000
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:8000"
READY_S = 900.0  # `make serve` may still install on a first run
STOP_S = 60.0


def fail(step: str, why: str, tail: collections.deque[str]) -> None:
    print("".join(tail), file=sys.stderr, end="")
    print(f"quickstart: {step} failed: {why}", file=sys.stderr)
    sys.exit(1)


def kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def running(proc: subprocess.Popen[str]) -> str:
    """The live processes of the session `make serve` leads (zombies do not count: `make`'s own
    is reaped here, the others by whoever adopted them)."""
    proc.poll()
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(proc.pid)],
                         capture_output=True, text=True).stdout  # fmt: skip
    return "\n".join(line for line in out.splitlines() if not line.split()[1].startswith("Z"))


def main() -> None:
    try:
        httpx.get(f"{URL}/readyz", timeout=2)
    except httpx.HTTPError:
        pass
    else:
        sys.exit(f"quickstart: {URL} already answers: stop what serves on port 8000 first")
    data = tempfile.mkdtemp(prefix="adaptd-quickstart-")
    env = dict(os.environ, ADAPTD_DATA_DIR=data)
    started = time.monotonic()
    proc = subprocess.Popen(
        ["make", "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=40)
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: tail.extend(out), daemon=True).start()
    try:
        # 1. make serve, ready
        while True:
            if proc.poll() is not None:
                fail("make serve", f"it exited with status {proc.returncode} before ready", tail)
            if time.monotonic() - started > READY_S:
                fail("make serve", f"not ready after {READY_S:.0f} s", tail)
            try:
                if httpx.get(f"{URL}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        print(f"quickstart: make serve ready after {time.monotonic() - started:.0f} s")

        # 2. the README's snippet: one chat, one feedback
        client = OpenAI(base_url=f"{URL}/v1", api_key="unused-on-loopback")
        raw = client.chat.completions.with_raw_response.create(
            model="adaptd",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
        )
        answer = raw.parse()
        text = answer.choices[0].message.content
        if not answer.id or not text or "Paris" not in text:
            fail("chat", f"no id, or an answer without Paris, in {answer!r}", tail)
        print(f"quickstart: chat answered ({answer.id}): {text!r}")
        r = httpx.post(f"{URL}/v1/feedback",
                       json={"interaction_id": answer.id, "rating": -1, "correction": "Paris."})  # fmt: skip
        if r.status_code != 201:
            fail("feedback", f"status {r.status_code}: {r.text[:300]}", tail)
        print(f"quickstart: feedback stored: {r.json()}")
    except SystemExit:
        kill(proc)
        raise
    except Exception as e:  # the client's own error, said as such
        kill(proc)
        fail("chat or feedback", f"{type(e).__name__}: {e}", tail)

    # 3. a clean stop: SIGTERM to the whole group (as Ctrl-C would reach it), nothing left behind
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_S
    while (left := running(proc)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        kill(proc)
        fail("stop", f"still running {STOP_S:.0f} s after SIGTERM:\n{left}", tail)
    try:
        httpx.get(f"{URL}/readyz", timeout=2)
        fail("stop", "port 8000 still answers after the stop", tail)
    except httpx.HTTPError:
        pass
    print(f"quickstart: stopped cleanly; passed in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
