"""Faults with the real daemon, its real vLLM child and training child, on a data directory of
their own (one daemon for the whole module, started once):

* a full disk, for real: the kernel's file-size limit (``RLIMIT_FSIZE``) is lowered on the
  running daemon to the size of its database files, so the database cannot grow (EFBIG, as a
  full disk gives ENOSPC); then on the training child, so the adapter it writes does not fit;
* another program holding SQLite's write lock past the busy timeout;
* vLLM killed in the middle of a swap, while the promoted version's file has been corrupted;
* a client hanging up in the middle of a long streamed answer.

Throughout: no 500, inference keeps answering, every acknowledged feedback row is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import INFERENCE_KEY, RunningDaemon, admin_headers, inference_headers
from procs import cmdline, descendants, wait_for

from daemon.promotion import sha256_of

pytestmark = pytest.mark.vllm

SWAP_PAUSE_S = 3  # every promotion waits this long once its version is loaded (fault injection)
TOPICS = [
    "the weather", "my printer", "a train ticket", "the garden", "a birthday cake", "the river",
    "an old bicycle", "the museum", "a chess opening", "my laptop battery", "the library card",
    "a lost umbrella",
]  # fmt: skip


HANG_UP_TOKENS = 1900


@pytest.fixture(scope="module")
def faulty(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    base = tmp_path_factory.mktemp("faults")
    d = RunningDaemon(
        model=tiny_model, data_dir=base / "data", log_path=base / "adaptd.log",
        extra_env={
            "ADAPTD_FAULT_PAUSE": f"swap={SWAP_PAUSE_S}",
            # the cycle here only has to reach the adapter's write: a short run, no Fisher
            "ADAPTD_TRAINING__STEPS": "4",
            "ADAPTD_TRAINING__EWC_LAMBDA": "0",
            # long answers for the hang-up: the shared daemon's 64 tokens take the tiny model
            # a few hundred ms, which a busy machine can spend before the gateway runs again;
            # 448 were once all made before it did (CI, 2 busy cores). The tiny model's whole
            # context (2048) served, for nearly as many as it leaves room for beside the prompt.
            "ADAPTD_LIMITS__MAX_TOKENS": str(HANG_UP_TOKENS),
            "ADAPTD_SERVING__MAX_MODEL_LEN": "2048",
        },
    )  # fmt: skip
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


def chat(d: RunningDaemon, prompt: str, model: str = "adaptd", **kw: Any) -> httpx.Response:
    headers = admin_headers() if model not in ("adaptd", "base") else inference_headers()
    return httpx.post(
        d.url + "/v1/chat/completions", headers=headers, timeout=120,
        json={"model": model, "messages": [{"role": "user", "content": prompt}],
              "max_tokens": 8, **kw},
    )  # fmt: skip


def feedback(d: RunningDaemon, **body: Any) -> httpx.Response:
    return httpx.post(d.url + "/v1/feedback", headers=inference_headers(), json=body, timeout=60)


def admin(d: RunningDaemon, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, d.url + path, headers=admin_headers(), timeout=120, **kw)


def stored_feedback(d: RunningDaemon) -> set[str]:
    with sqlite3.connect(f"file:{d.data_dir / 'adaptd.db'}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {r[0] for r in conn.execute("SELECT id FROM feedback")}


def openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "server_error" and err["message"], err


def metric(d: RunningDaemon, line_start: str) -> float:
    for line in httpx.get(d.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def vllm_tokens(d: RunningDaemon) -> float:
    """How many tokens vLLM has generated, by its own count (its /metrics needs no key)."""
    assert d.proc is not None
    args = next(
        cmdline(p).split() for p in descendants(d.proc.pid) if "--enable-lora" in cmdline(p)
    )
    port = args[args.index("--port") + 1]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total{")
    )


def test_a_client_hanging_up_mid_stream_is_logged_aborted_and_vllm_stops(
    faulty: RunningDaemon,
) -> None:
    """The client hangs up at its first event, or at 0.5 s if none has come by then (on a busy
    machine the tiny model's vLLM can leave its frontend unscheduled while it makes the whole
    answer). 1,900 tokens (ignore_eos, a vLLM sampling parameter, passed through) take the tiny
    model about ten seconds, so the answer is unfinished either way."""
    marker = f"hang-up {time.time_ns()}"
    body = json.dumps({"model": "adaptd", "messages": [{"role": "user", "content": marker}],
                       "max_tokens": HANG_UP_TOKENS, "stream": True, "ignore_eos": True}).encode()  # fmt: skip
    before = vllm_tokens(faulty)
    with socket.create_connection(("127.0.0.1", faulty.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: adaptd\r\n"
            b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (INFERENCE_KEY.encode(), len(body), body)
        )
        got, deadline = b"", time.monotonic() + 0.5
        while b"data: " not in got and (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            with contextlib.suppress(TimeoutError):
                got += s.recv(65536)

    def rows() -> list[dict[str, Any]]:
        with sqlite3.connect(faulty.data_dir / "adaptd.db") as conn:
            conn.row_factory = sqlite3.Row
            found = conn.execute("SELECT * FROM interactions WHERE instr(request, ?)", [marker])
            return [dict(r) for r in found]

    wait_for(rows, 30, "the interaction's row")
    row = rows()
    assert [(r["status"], r["completion_tokens"]) for r in row] == [("aborted", None)], (got, row)
    # the gateway dropped its upstream connection, and vLLM stopped making the answer
    time.sleep(3)  # the whole answer takes the tiny model longer than this
    assert vllm_tokens(faulty) - before < 100, (before, vllm_tokens(faulty), rows())


def test_a_full_disk_refuses_feedback_with_507_and_serving_goes_on(faulty: RunningDaemon) -> None:
    d = faulty
    assert d.proc is not None
    iids = [chat(d, f"Before the disk fills, question {i}").json()["id"] for i in range(3)]
    acked = {feedback(d, interaction_id=iid, rating=1).json()["id"] for iid in iids}
    db = d.data_dir / "adaptd.db"
    limit = max(p.stat().st_size for p in db.parent.glob("adaptd.db*") if p.suffix != ".db-shm")
    soft, hard = resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        refused = []
        for i in range(400):  # the database grows into what its files hold, then no more
            answer = chat(d, f"While the disk is full, question {i}")
            assert answer.status_code == 200, answer.text  # the log fails, not the request
            r = feedback(d, interaction_id=iids[i % 3], comment=f"full {i}")
            if r.status_code == 201:
                acked.add(r.json()["id"])
                continue
            openai_error(r, 507, "insufficient_storage")
            assert (
                r.headers["retry-after"] == "10" and "disk is full" in r.json()["error"]["message"]
            )
            refused.append(r)
            if len(refused) == 3:
                break
        assert len(refused) == 3, "the database never filled up"
        openai_error(admin(d, "POST", "/admin/cycles"), 507, "insufficient_storage")
        assert admin(d, "GET", "/admin/status").status_code == 200  # reads carry on
        assert httpx.get(d.url + "/readyz", timeout=10).status_code == 200
        assert d.proc.poll() is None  # SIGXFSZ did not kill it
    finally:
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert metric(d, "adaptd_interaction_log_failed_total") >= 1
    assert metric(d, 'adaptd_requests_total{route="/v1/feedback",status="507"}') >= 3
    r = feedback(d, interaction_id=iids[0], comment="room again")
    assert r.status_code == 201, r.text
    acked.add(r.json()["id"])
    assert stored_feedback(d) == acked  # every 201, and nothing refused


def test_a_lock_held_past_the_busy_timeout_gives_503_then_writes_succeed(
    faulty: RunningDaemon,
) -> None:
    d = faulty
    iid = chat(d, "A question before the lock").json()["id"]
    acked = stored_feedback(d) | {feedback(d, interaction_id=iid, rating=1).json()["id"]}
    other = sqlite3.connect(d.data_dir / "adaptd.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program writes, and takes its time
    try:
        t0 = time.monotonic()
        r = feedback(d, interaction_id=iid, rating=-1)
        openai_error(r, 503, "store_busy")
        assert r.headers["retry-after"] == "1"
        assert time.monotonic() - t0 >= 4.5  # it waited for the lock (busy_timeout 5 s) first
        assert chat(d, "A question while the database is locked").status_code == 200
    finally:
        other.execute("ROLLBACK")
        other.close()
    r = feedback(d, interaction_id=iid, rating=-1)
    assert r.status_code == 201, r.text
    assert stored_feedback(d) == acked | {r.json()["id"]}


def test_training_with_no_room_for_its_adapter_fails_the_cycle_cleanly(
    faulty: RunningDaemon,
) -> None:
    d = faulty
    assert d.proc is not None
    for i, topic in enumerate(TOPICS):
        iid = chat(d, f"Tell me about {topic}.").json()["id"]
        r = feedback(d, interaction_id=iid, rating=-1, user=f"u{i % 6}",
                     correction="Thank you for asking. Please see the manual, page one.")  # fmt: skip
        assert r.status_code == 201, r.text
    limited: list[int] = []
    done = threading.Event()

    def limit_learners() -> None:  # the adapter (128 KiB) does not fit in 32 KiB
        while not done.is_set():
            for pid in descendants(d.proc.pid) - set(limited):  # type: ignore[union-attr]
                if "learners.run" in cmdline(pid):
                    resource.prlimit(
                        pid, resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY)
                    )
                    limited.append(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=limit_learners, daemon=True)
    watcher.start()
    try:
        r = admin(d, "POST", "/admin/cycles")
        assert r.status_code == 202, r.text
        cycle = r.json()
        deadline = time.monotonic() + 400
        while cycle["decision"] is None:
            assert time.monotonic() < deadline, f"cycle still {cycle['state']}"
            time.sleep(0.5)
            cycle = admin(d, "GET", f"/admin/cycles/{cycle['id']}").json()
    finally:
        done.set()
        watcher.join(10)
    assert (cycle["state"], cycle["decision"]) == ("failed", "failed"), cycle
    reason = cycle["reasons"][0]
    assert "training could not write its files: no room" in reason, reason
    assert "File too large" in reason, reason
    assert len(limited) == 1  # not restarted: it would fail the same way
    version = cycle["version"]
    assert version not in {v["name"] for v in admin(d, "GET", "/admin/versions").json()["versions"]}
    adapters = d.data_dir / "adapters"
    assert not [p.name for p in adapters.iterdir() if p.name.startswith(".")]  # no staging, no tmp
    assert not (d.data_dir / "work" / version).exists()
    assert chat(d, "Still serving?").status_code == 200


def craft_versions(d: RunningDaemon, tiny_model: Path, names: list[str]) -> None:
    """Registered versions without a cycle: one random adapter under several names, with a
    probe (what the adapter and the base model answer) so that promotion can prove it."""
    from tinymodel import make_random_adapter

    src = make_random_adapter(tiny_model, d.data_dir / "work" / "crafted", rank=8, seed=3)
    (src / "README.md").unlink(missing_ok=True)
    for name in names:
        shutil.copytree(src, d.data_dir / "adapters" / name)
        with sqlite3.connect(d.data_dir / "adaptd.db") as conn:
            conn.execute(
                "INSERT INTO adapter_versions (name, created_at, parent, path, sha256, manifest) "
                "VALUES (?, ?, NULL, ?, ?, ?)",
                [name, time.time(), f"adapters/{name}",
                 sha256_of(src / "adapter_model.safetensors"),
                 json.dumps({"decision": {"passed": True}})],
            )  # fmt: skip
    prompts = ["What is the capital of Peru?", "Who reads a book?"]
    items = []
    for p in prompts:
        answers = [chat(d, p, model=m, temperature=0).json() for m in (names[0], "base")]
        cand, base = (a["choices"][0]["message"]["content"] for a in answers)
        items.append(
            {"messages": [{"role": "user", "content": p}], "candidate": cand, "base": base}
        )
    assert any(it["candidate"] != it["base"] for it in items)  # the adapter is applied
    for name in names:
        manifest = {"version": name, "metrics": {"probe": {"items": items, "max_tokens": 8}}}
        (d.data_dir / "adapters" / name / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(src)


def test_vllm_dies_during_a_swap_and_a_corrupted_version_is_rolled_back(
    faulty: RunningDaemon, tiny_model: Path
) -> None:
    d = faulty
    craft_versions(d, tiny_model, ["v0101", "v0102", "v0103"])
    for name in ("v0101", "v0103"):
        r = admin(d, "POST", f"/admin/versions/{name}/promote", json={})
        assert r.status_code == 200, r.text
    # The promoted version's file is corrupted on disk; vLLM still holds the good copy.
    weights = d.data_dir / "adapters" / "v0103" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-8:] = bytes(b ^ 0xFF for b in raw[-8:])  # in the tensor data: the file still parses
    weights.write_bytes(bytes(raw))

    stop, seen = threading.Event(), []

    def traffic() -> None:
        while not stop.is_set():
            try:
                r = chat(d, "Hello during the swap")
            except httpx.HTTPError as e:  # pragma: no cover - reported below
                seen.append((0, repr(e), ""))
                continue
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else ""
            seen.append((r.status_code, code, r.headers.get("x-adaptd-version", "")))
            time.sleep(0.05)

    load = threading.Thread(target=traffic, daemon=True)
    load.start()
    swap: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: swap.setdefault("r", admin(d, "POST", "/admin/versions/v0102/promote",
                                                  json={})),
    )  # fmt: skip
    t.start()
    wait_for(lambda: "v0102" in admin(d, "GET", "/admin/status").json()["engine"]["adapters_loaded"],
             60, "v0102 to be loaded for the swap")  # fmt: skip
    pid = d.engine_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # vLLM dies between the load and the flip
    wait_for(lambda: httpx.get(d.url + "/readyz", timeout=5).status_code == 503, 30,
             "the daemon to notice")  # fmt: skip
    t.join(120)
    openai_error(swap["r"], 503, "engine_unavailable")  # the swap failed cleanly
    wait_for(lambda: httpx.get(d.url + "/readyz", timeout=5).status_code == 200, 400,
             "vLLM to come back")  # fmt: skip
    time.sleep(1.0)
    stop.set()
    load.join(120)

    statuses = {(s, c) for s, c, _ in seen}
    assert statuses <= {(200, ""), (503, "not_ready"), (503, "engine_unavailable")}, statuses
    assert (503, "not_ready") in statuses  # the restart was seen, and answered cleanly
    history = admin(d, "GET", "/admin/promotions").json()["promotions"]
    last = history[-1]
    assert (last["action"], last["version"], last["previous"], last["actor"]) == (
        "rollback", "v0101", "v0103", "restart")  # fmt: skip
    assert "after vLLM restarted" in last["reason"] and "sha256 differs" in last["reason"]
    assert "v0102" not in [h["version"] for h in history]  # never half-promoted
    st = admin(d, "GET", "/admin/status").json()
    assert st["serving"]["version"] == "v0101" and st["engine"]["restarts"] == 1
    assert "v0101" in st["engine"]["adapters_loaded"]
    assert "v0103" not in st["engine"]["adapters_loaded"]  # not loaded again once corrupted
    r = chat(d, "Which version now?")
    assert r.status_code == 200 and r.headers["x-adaptd-version"] == "v0101"
    assert seen[-1][2] == "v0101"
    refused = chat(d, "And the corrupted one?", model="v0103")
    assert refused.status_code == 409 and "sha256 differs" in refused.json()["error"]["message"]
