"""Crashes and stops in the middle of a cycle, with the real daemon, vLLM and training child.

The daemon is killed with SIGKILL while a cycle trains (a live learner child), evaluates and
promotes, and stopped with SIGTERM while it trains. After each restart: no feedback lost, no
process of the old daemon left (vLLM and learner children included), the cycle resumed from
its last finished stage and ended with a decision, and the `adaptd` alias names a version
vLLM holds. `ADAPTD_FAULT_PAUSE` holds the cycle in `promoting` long enough to kill it there.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from typing import Any

import httpx
import pytest
from conftest import (
    HOUSE_STYLE_GATE,
    RunningDaemon,
    admin_headers,
    chat_on_side,
    inference_headers,
)
from procs import alive, cmdline, descendants, wait_for

pytestmark = pytest.mark.vllm

OWN_DAEMON_SETTINGS = True  # conftest: this module sets the daemon's data directory and env
TERMINAL = {"done", "rejected", "awaiting_approval", "failed"}


@pytest.fixture(scope="module")
def paused(daemon: RunningDaemon, tmp_path_factory: pytest.TempPathFactory) -> RunningDaemon:
    """The shared daemon on a data directory of its own (the shared one holds earlier tests'
    feedback, garbage included), held 15 s in `promoting` by the fault injection. The cycles
    teach a house style and must reach `promoting`: the general gate allows 10 % (see
    `conftest.HOUSE_STYLE_GATE`)."""
    daemon.use(
        tmp_path_factory.mktemp("recovery") / "data",
        {"ADAPTD_FAULT_PAUSE": "promoting=15", **HOUSE_STYLE_GATE},
    )
    return daemon


def feedback(daemon: RunningDaemon, style: str, tag: str) -> None:
    with httpx.Client(base_url=daemon.url, headers=inference_headers(), timeout=60) as c:
        for i in range(24):
            body = {"model": "adaptd", "max_tokens": 4,
                    "messages": [{"role": "user", "content": f"{tag} question {i}: what about item {i * 7}?"}]}  # fmt: skip
            # three surely held out: the gate needs two to judge the resumed cycle at all
            r = (
                chat_on_side(c, body, holdout=True)
                if i < 3
                else c.post("/v1/chat/completions", json=body)
            )
            assert r.status_code == 200
            fb = c.post("/v1/feedback", json={"interaction_id": r.json()["id"],
                                               "correction": style, "user": f"u{i % 6}"})  # fmt: skip
            assert fb.status_code == 201


def rows(daemon: RunningDaemon) -> tuple[int, int]:
    with sqlite3.connect(daemon.data_dir / "adaptd.db") as conn:
        return (
            conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0],
        )


def cycle_of(daemon: RunningDaemon, cid: str) -> dict[str, Any]:
    r = httpx.get(daemon.url + f"/admin/cycles/{cid}", headers=admin_headers(), timeout=30)
    return dict(r.json())


def start_cycle(daemon: RunningDaemon) -> str:
    r = httpx.post(daemon.url + "/admin/cycles", headers=admin_headers(), timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait_state(daemon: RunningDaemon, cid: str, state: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = cycle_of(daemon, cid)
        if c["state"] == state:
            return
        assert c["state"] not in TERMINAL, (
            f"cycle ended {c['state']} before {state}: {c['reasons']}"
        )
        time.sleep(0.1)
    raise AssertionError(f"cycle {cid} never reached {state}")


def learner_child(tree: set[int]) -> bool:
    return any("learners.run" in cmdline(p) for p in tree)


def kill(daemon: RunningDaemon, sig: int = signal.SIGKILL) -> None:
    assert daemon.proc is not None
    tree = descendants(daemon.proc.pid)
    daemon.proc.send_signal(sig)
    code = daemon.proc.wait(120)
    if sig == signal.SIGTERM:
        assert code == 0, daemon.tail()
    wait_for(lambda: not any(alive(p) for p in tree), 60, "every child of the daemon to go")


def finish(
    daemon: RunningDaemon, cid: str, resumed_from: str, timeout: float = 400
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    c = cycle_of(daemon, cid)
    while c["state"] not in TERMINAL:
        assert time.monotonic() < deadline, f"cycle {cid} stuck in {c['state']}"
        time.sleep(0.5)
        c = cycle_of(daemon, cid)
    assert any(f"resumed after a restart from state '{resumed_from}'" in r for r in c["reasons"]), c
    assert c["decision"] in {"promoted", "rejected"}, c["reasons"]
    return c


def alias_is_loaded(daemon: RunningDaemon) -> None:
    st = httpx.get(daemon.url + "/admin/status", headers=admin_headers(), timeout=30).json()
    version = st["serving"]["version"]
    assert version == "base" or version in st["engine"]["adapters_loaded"], st
    r = httpx.post(daemon.url + "/v1/chat/completions", headers=inference_headers(), timeout=60,
                   json={"model": "adaptd", "max_tokens": 4,
                         "messages": [{"role": "user", "content": "Hello"}]})  # fmt: skip
    assert r.status_code == 200 and r.headers["x-adaptd-version"] == version


def test_sigkill_while_training_and_while_promoting(paused: RunningDaemon) -> None:
    d = paused
    feedback(d, "Alpha style answer: please ask the front desk.", "alpha")
    before = rows(d)
    cid = start_cycle(d)
    wait_state(d, cid, "training")
    assert d.proc is not None
    wait_for(lambda: learner_child(descendants(d.proc.pid)), 120, "the training child")  # type: ignore[union-attr]
    kill(d)  # SIGKILL mid-training: the learner child must go too
    d.start()
    assert rows(d)[0] == before[0]
    wait_state(d, cid, "promoting")  # resumed, retrained, judged; held here by the fault pause
    kill(d)
    d.start()
    c = finish(d, cid, "promoting")
    assert rows(d)[0] == before[0]
    alias_is_loaded(d)
    history = httpx.get(d.url + "/admin/promotions", headers=admin_headers(), timeout=30).json()
    if c["decision"] == "promoted":  # promoted exactly once, never half
        assert [h["version"] for h in history["promotions"]].count(c["version"]) == 1


def test_sigkill_while_evaluating(paused: RunningDaemon) -> None:
    d = paused
    feedback(d, "Beta style answer: the manual has it on page nine.", "beta")
    before = rows(d)
    cid = start_cycle(d)
    wait_state(d, cid, "evaluating")
    kill(d)
    d.start()
    finish(d, cid, "evaluating")
    assert rows(d)[0] == before[0]
    alias_is_loaded(d)
    staged = [p.name for p in (d.data_dir / "adapters").iterdir() if p.name.startswith(".staging")]
    assert not staged


def test_sigterm_while_training_stops_at_a_step_and_resumes(paused: RunningDaemon) -> None:
    d = paused
    feedback(d, "Gamma style answer: write to the help line.", "gamma")
    before = rows(d)
    cid = start_cycle(d)
    wait_state(d, cid, "training")
    assert d.proc is not None
    wait_for(lambda: learner_child(descendants(d.proc.pid)), 120, "the training child")  # type: ignore[union-attr]
    t0 = time.monotonic()
    kill(d, signal.SIGTERM)
    assert time.monotonic() - t0 < 60
    assert "Traceback" not in d.tail(300)
    d.start()
    finish(d, cid, "training")
    assert rows(d)[0] == before[0]
    alias_is_loaded(d)
