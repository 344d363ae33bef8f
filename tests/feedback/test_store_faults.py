"""The store under faults: a full disk, a database locked by another program, long readers.

The full disk is real, not mocked: a child process lowers its own file-size limit
(``RLIMIT_FSIZE``, SIGXFSZ ignored as the daemon does) so that every write past the database's
current size fails in the kernel with EFBIG, exactly where a full disk fails with ENOSPC.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from feedback.errors import StoreBusy, StoreError, StoreFull
from feedback.store import FeedbackInput, Interaction, Store, write_error
from feedback.writer import Writer

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0


def interaction(iid: str) -> Interaction:
    return Interaction(
        id=iid, created_at=time.time(), endpoint="chat", model="adaptd", version="base",
        caller="anonymous", request=[{"role": "user", "content": f"question {iid}"}],
        params={}, output=f"answer {iid}",
    )  # fmt: skip


def sqlite_error(code: int, name: str) -> sqlite3.Error:
    e = sqlite3.OperationalError("boom")
    e.sqlite_errorcode = code  # type: ignore[attr-defined]
    e.sqlite_errorname = name  # type: ignore[attr-defined]
    return e


@pytest.mark.parametrize(
    ("code", "name", "kind", "status"),
    [
        (sqlite3.SQLITE_BUSY, "SQLITE_BUSY", StoreBusy, 503),
        (773, "SQLITE_BUSY_TIMEOUT", StoreBusy, 503),
        (517, "SQLITE_BUSY_SNAPSHOT", StoreBusy, 503),
        (sqlite3.SQLITE_LOCKED, "SQLITE_LOCKED", StoreBusy, 503),
        (sqlite3.SQLITE_FULL, "SQLITE_FULL", StoreFull, 507),
        (sqlite3.SQLITE_IOERR_WRITE, "SQLITE_IOERR_WRITE", StoreFull, 507),  # EFBIG, EDQUOT
        (sqlite3.SQLITE_IOERR_FSYNC, "SQLITE_IOERR_FSYNC", StoreFull, 507),
        (sqlite3.SQLITE_IOERR_READ, "SQLITE_IOERR_READ", StoreError, 500),
        (sqlite3.SQLITE_CORRUPT, "SQLITE_CORRUPT", StoreError, 500),
        (sqlite3.SQLITE_CONSTRAINT, "SQLITE_CONSTRAINT", StoreError, 500),
    ],
)
def test_write_errors_map_to_the_store_errors(
    code: int, name: str, kind: type[Exception], status: int
) -> None:
    err = write_error(sqlite_error(code, name))
    assert type(err) is kind and err.status == status and name in str(err)
    if status in (503, 507):
        assert int(err.headers["Retry-After"]) > 0  # type: ignore[union-attr]


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    path = tmp_path / "adaptd.db"
    s = Store(path)
    s.migrate()
    s.close()
    return path


@pytest.fixture()
def writer(db: Path) -> Iterator[Writer]:
    store = Store(db, busy_timeout_ms=300)
    w = Writer(store)
    yield w
    w.close()
    store.close()


def feedback_ids(db: Path) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM feedback")}


def store_feedback(w: Writer, iid: str, n: int) -> str:
    fb = w.call_sync(
        lambda s: s.add_feedback(FeedbackInput(interaction_id=iid, rating=1, id=f"fb-{n}"))
    )
    return fb.id


def test_long_readers_never_make_a_write_fail(db: Path, writer: Writer) -> None:
    """WAL readers see their snapshot and never block the writer, however long they read."""
    writer.log_interaction(interaction("i-1"))
    writer.flush()
    holding, done = threading.Barrier(5), threading.Event()
    seen: list[int] = []

    def reader() -> None:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        conn.execute("BEGIN")
        first = conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
        holding.wait(TIMEOUT)
        done.wait(TIMEOUT)
        seen.append(conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] - first)
        conn.execute("COMMIT")
        conn.close()

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    holding.wait(TIMEOUT)
    acked = {store_feedback(writer, "i-1", n) for n in range(200)}
    done.set()
    for t in threads:
        t.join(TIMEOUT)
    assert seen == [0, 0, 0, 0]  # each reader kept its snapshot to the end
    assert feedback_ids(db) == acked


def test_a_lock_held_past_busy_timeout_refuses_then_recovers(db: Path, writer: Writer) -> None:
    writer.log_interaction(interaction("i-1"))
    acked = {store_feedback(writer, "i-1", 0)}
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another program's writer
        t0 = time.monotonic()
        with pytest.raises(StoreBusy, match="locked by another connection") as refused:
            store_feedback(writer, "i-1", 1)
        assert time.monotonic() - t0 >= 0.25  # it waited busy_timeout first
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
        writer.log_interaction(interaction("i-lost"))  # a log in a refused batch is counted
        with pytest.raises(StoreBusy):
            store_feedback(writer, "i-1", 2)
        assert writer.stats().failed >= 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    acked.add(store_feedback(writer, "i-1", 3))  # the writer carries on
    assert feedback_ids(db) == acked


def test_a_lock_held_shorter_than_busy_timeout_only_delays(db: Path) -> None:
    store = Store(db, busy_timeout_ms=5000)
    w = Writer(store)
    try:
        w.log_interaction(interaction("i-1"))
        w.flush()
        other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
        assert store_feedback(w, "i-1", 0) == "fb-0"
        other.close()
    finally:
        w.close()
        store.close()


# Runs in a child process, so the limit never touches pytest itself.
FULL_DISK = r"""
import json, resource, signal, sys, time
from pathlib import Path
from feedback.errors import StoreFull
from feedback.store import FeedbackInput, Interaction, Store
from feedback.writer import Writer

db = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the daemon does: an error, not death
store = Store(db); store.migrate(); w = Writer(store)
for i in range(20):
    w.log_interaction(Interaction(id=f"i-{i}", created_at=time.time(), endpoint="chat",
        model="adaptd", version="base", caller="x", request=[{"role": "user", "content": "q"}],
        params={}, output="a" * 500))
w.flush()
def fb(n):
    return lambda s: s.add_feedback(FeedbackInput(interaction_id=f"i-{n % 20}", rating=1,
                                                  comment="c" * 300, id=f"fb-{n}"))
acked = [w.call_sync(fb(n)).id for n in range(5)]
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
resource.setrlimit(resource.RLIMIT_FSIZE, (max(p.stat().st_size for p in files), hard))
out = {"refused": [], "other": []}
for n in range(5, 400):  # the database may grow into what its files hold, then no more
    try:
        acked.append(w.call_sync(fb(n)).id)
    except StoreFull as e:
        out["refused"].append([e.status, e.code, str(e)])
    except Exception as e:
        out["other"].append(repr(e))
    if len(out["refused"]) >= 3:
        break
w.log_interaction(Interaction(id="i-lost", created_at=time.time(), endpoint="chat",
    model="adaptd", version="base", caller="x", request=[], params={}, output="a" * 500))
try:
    w.flush()
except Exception:
    pass
out["failed_logs"] = w.stats().failed
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
acked.append(w.call_sync(fb(1000)).id)
out["acked"] = acked
w.close(); store.close()
print(json.dumps(out))
"""


def test_a_full_disk_refuses_writes_cleanly_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "adaptd.db"
    run = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(db)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["other"] == []
    assert len(out["refused"]) == 3
    for status, code, message in out["refused"]:
        assert (status, code) == (507, "insufficient_storage")
        assert "the disk is full" in message and "nothing was stored" in message
    assert out["failed_logs"] >= 1  # the interaction log of a refused batch is counted
    assert feedback_ids(db) == set(out["acked"])  # every acknowledged write, nothing else
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT COUNT(*) FROM interactions WHERE id = 'i-lost'").fetchone() == (
            0,
        )
