"""The daemon's process lifecycle with the real vLLM child: crash of the child, SIGKILL and
restart of the daemon. These run after the gateway tests (they restart the shared daemon).
"""

from __future__ import annotations

import os
import signal
import sqlite3

import httpx
import pytest
from conftest import RunningDaemon, admin_headers, inference_headers
from procs import alive, descendants, wait_for

pytestmark = pytest.mark.vllm

CHAT = {"model": "adaptd", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def ready(daemon: RunningDaemon) -> bool:
    try:
        return httpx.get(daemon.url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_vllm_child_is_noticed_and_replaced(daemon: RunningDaemon) -> None:
    pid = daemon.engine_pid()
    assert pid is not None and alive(pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not ready(daemon), 15, "/readyz to turn false")
    r = httpx.post(
        daemon.url + "/v1/chat/completions", json=CHAT, headers=inference_headers(), timeout=30
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    wait_for(lambda: ready(daemon), 600, "vLLM to come back")
    st = httpx.get(daemon.url + "/admin/status", headers=admin_headers()).json()
    assert st["engine"]["restarts"] == 1 and st["engine"]["pid"] not in (None, pid)
    r = httpx.post(
        daemon.url + "/v1/chat/completions", json=CHAT, headers=inference_headers(), timeout=60
    )
    assert r.status_code == 200
    assert "adaptd_engine_restarts_total 1.0" in httpx.get(daemon.url + "/metrics").text


def test_sigkill_leaves_no_orphan_and_data_survives_a_restart(daemon: RunningDaemon) -> None:
    r = httpx.post(
        daemon.url + "/v1/chat/completions", json=CHAT, headers=inference_headers(), timeout=60
    )
    iid = r.json()["id"]
    fb = httpx.post(
        daemon.url + "/v1/feedback",
        json={"interaction_id": iid, "rating": 1},
        headers=inference_headers(),
    )
    assert fb.status_code == 201
    db = daemon.data_dir / "adaptd.db"
    with sqlite3.connect(db) as conn:
        before = (
            conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0],
        )
    assert daemon.proc is not None
    tree = descendants(daemon.proc.pid)
    assert len(tree) >= 3  # reaper, vLLM's api_server and its engine processes
    daemon.proc.kill()
    daemon.proc.wait(10)
    wait_for(lambda: not any(alive(p) for p in tree), 60, "vLLM's processes to go")

    daemon.start()
    with sqlite3.connect(db) as conn:
        after = (
            conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0],
        )
        assert conn.execute(
            "SELECT rating FROM feedback WHERE id = ?", [fb.json()["id"]]
        ).fetchone() == (1,)
    assert after == before
    # The old interaction still takes feedback after the restart.
    again = httpx.post(
        daemon.url + "/v1/feedback",
        json={"interaction_id": iid, "comment": "still here"},
        headers=inference_headers(),
    )
    assert again.status_code == 201


def test_sigterm_stops_cleanly_and_takes_vllm_along(daemon: RunningDaemon) -> None:
    assert daemon.proc is not None
    tree = descendants(daemon.proc.pid)
    assert daemon.stop(signal.SIGTERM, timeout=90) == 0
    wait_for(lambda: not any(alive(p) for p in tree), 60, "vLLM's processes to go")
    assert "Traceback" not in daemon.tail(200)
    daemon.start()  # leave the shared daemon running for any later test
