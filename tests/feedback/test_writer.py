"""`feedback.writer.Writer`: one thread, group commit, bounded queue, arrival order.

Commits are checked through a second (read-only) connection, so a test only passes when
the data really reached the database file, not just the writer's open transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from feedback.errors import StoreBusy, StoreError, UnknownInteraction
from feedback.store import Feedback, FeedbackInput, Interaction, Store
from feedback.writer import Writer

TIMEOUT = 30.0


def make_interaction(iid: str) -> Interaction:
    return Interaction(
        id=iid,
        created_at=time.time(),
        endpoint="chat",
        model="adaptd",
        version="base",
        caller="anonymous",
        request=[{"role": "user", "content": f"question {iid}"}],
        params={},
        output=f"answer {iid}",
    )


def add(iid: str, *, rating: int = 1, fid: str | None = None) -> Callable[[Store], Feedback]:
    return lambda store: store.add_feedback(
        FeedbackInput(interaction_id=iid, rating=rating, id=fid)
    )


class Gate:
    """A job that holds the writer thread until released; the queue fills up behind it."""

    def __init__(self, writer: Writer) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.future = writer.submit(self._hold)
        assert self.started.wait(TIMEOUT), "the writer never ran the gate job"

    def _hold(self, store: Store) -> str:
        self.started.set()
        if not self.release.wait(TIMEOUT):
            raise RuntimeError("gate never released")
        return "gate"

    def open(self) -> None:
        self.release.set()
        assert self.future.result(TIMEOUT) == "gate"


@pytest.fixture()
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "adaptd.db"
    s = Store(path)
    s.migrate()
    s.close()
    return path


@pytest.fixture()
def make_writer(db_path: Path) -> Iterator[Callable[..., Writer]]:
    opened: list[tuple[Writer, Store]] = []

    def make(**kwargs: Any) -> Writer:
        store = Store(db_path)
        w = Writer(store, **kwargs)
        opened.append((w, store))
        return w

    yield make
    for w, store in opened:
        w.close(timeout=TIMEOUT)
        store.close()


@pytest.fixture()
def writer(make_writer: Callable[..., Writer]) -> Writer:
    return make_writer()


@pytest.fixture()
def reader(db_path: Path) -> Iterator[Store]:
    r = Store(db_path, readonly=True)
    yield r
    r.close()


def ids(reader: Store, table: str) -> set[str]:
    return {row[0] for row in reader.db.execute(f"SELECT id FROM [{table}]")}


def seed_interaction(writer: Writer, iid: str = "chatcmpl-seed") -> str:
    assert writer.log_interaction(make_interaction(iid))
    writer.flush(TIMEOUT)
    return iid


# --------------------------------------------------------------------------- basics


def test_logged_interactions_are_committed_after_flush(writer: Writer, reader: Store) -> None:
    for i in range(3):
        assert writer.log_interaction(make_interaction(f"chatcmpl-{i}")) is True
    writer.flush(TIMEOUT)
    assert ids(reader, "interactions") == {"chatcmpl-0", "chatcmpl-1", "chatcmpl-2"}
    got = reader.get_interaction("chatcmpl-1")
    assert got is not None and got.output == "answer chatcmpl-1"
    st = writer.stats()
    assert (st.logged, st.dropped, st.failed, st.pending) == (3, 0, 0, 0)


def test_submit_resolves_after_commit_with_the_value(writer: Writer, reader: Store) -> None:
    iid = seed_interaction(writer)
    fb = writer.submit(add(iid, rating=-1)).result(TIMEOUT)
    assert isinstance(fb, Feedback) and fb.rating == -1
    # Resolved means committed: another connection sees it at once.
    assert ids(reader, "feedback") == {fb.id}


def test_call_awaits_the_commit(writer: Writer, reader: Store) -> None:
    iid = seed_interaction(writer)

    async def go() -> Feedback:
        return await writer.call(add(iid))

    fb = asyncio.run(go())
    assert ids(reader, "feedback") == {fb.id}


# --------------------------------------------------------------------------- group commit


def test_group_commit_of_500_concurrent_submissions(writer: Writer, reader: Store) -> None:
    iid = seed_interaction(writer)
    commits_before = writer.stats().commits
    gate = Gate(writer)  # the 500 jobs queue up while the writer is busy, as under load
    futures: list[concurrent.futures.Future[Feedback]] = []
    lock = threading.Lock()

    def submit_many(start: int) -> None:
        for i in range(start, start + 50):
            fut = writer.submit(add(iid, rating=(i % 3) - 1, fid=f"fb-{i:03d}"))
            with lock:
                futures.append(fut)

    threads = [threading.Thread(target=submit_many, args=(n * 50,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert len(futures) == 500
    gate.open()
    results = [f.result(TIMEOUT) for f in futures]
    assert {fb.id for fb in results} == {f"fb-{i:03d}" for i in range(500)}
    assert ids(reader, "feedback") == {f"fb-{i:03d}" for i in range(500)}
    commits = writer.stats().commits - commits_before
    assert commits <= 10, f"{commits} commits for 500 jobs: no group commit"
    assert writer.stats().jobs >= 500


def test_a_failing_job_fails_alone(writer: Writer, reader: Store) -> None:
    iid = seed_interaction(writer)

    def write_then_fail(store: Store) -> None:
        store.add_feedback(FeedbackInput(interaction_id=iid, rating=1, id="fb-undone"))
        raise RuntimeError("boom")

    gate = Gate(writer)
    commits_before = writer.stats().commits
    good1 = writer.submit(add(iid, fid="fb-good-1"))
    unknown = writer.submit(add("chatcmpl-missing", fid="fb-orphan"))
    broken = writer.submit(write_then_fail)
    good2 = writer.submit(add(iid, fid="fb-good-2"))
    gate.open()
    assert good1.result(TIMEOUT).id == "fb-good-1"
    assert good2.result(TIMEOUT).id == "fb-good-2"
    with pytest.raises(UnknownInteraction):
        unknown.result(TIMEOUT)
    with pytest.raises(StoreError, match="boom"):
        broken.result(TIMEOUT)
    assert ids(reader, "feedback") == {"fb-good-1", "fb-good-2"}
    # They shared the gate's batch or one after it: never one commit per job.
    assert writer.stats().commits - commits_before <= 2


# --------------------------------------------------------------------------- back-pressure


def test_full_queue_drops_logs_and_refuses_feedback(
    make_writer: Callable[..., Writer], reader: Store
) -> None:
    writer = make_writer(max_pending=16)
    iid = seed_interaction(writer)
    gate = Gate(writer)

    accepted = [f"chatcmpl-a{i}" for i in range(15)]
    for a in accepted:
        assert writer.log_interaction(make_interaction(a)) is True
    queued_fb = writer.submit(add(iid, fid="fb-queued"))  # the 16th pending write
    assert writer.stats().pending == 16

    dropped = [f"chatcmpl-d{i}" for i in range(5)]
    for d in dropped:
        assert writer.log_interaction(make_interaction(d)) is False
    assert writer.stats().dropped == 5
    with pytest.raises(StoreBusy) as busy:
        writer.submit(add(iid, fid="fb-refused"))
    assert busy.value.status == 503 and busy.value.code == "store_busy"

    gate.open()
    assert queued_fb.result(TIMEOUT).id == "fb-queued"
    deadline = time.monotonic() + TIMEOUT
    while writer.stats().pending and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.flush(TIMEOUT)

    logged = ids(reader, "interactions")
    assert set(accepted) <= logged
    assert not set(dropped) & logged
    assert ids(reader, "feedback") == {"fb-queued"}
    st = writer.stats()
    assert (st.dropped, st.failed, st.pending) == (5, 0, 0)
    assert st.logged == 1 + len(accepted)


def test_flush_waits_when_the_queue_is_full(
    make_writer: Callable[..., Writer], reader: Store
) -> None:
    """`flush()` promises to block until what is queued is committed; a full queue must not
    turn that into StoreBusy."""
    writer = make_writer(max_pending=16)
    gate = Gate(writer)
    for i in range(16):
        assert writer.log_interaction(make_interaction(f"chatcmpl-{i}"))
    timer = threading.Timer(0.2, gate.release.set)
    timer.start()
    try:
        writer.flush(TIMEOUT)
    finally:
        timer.cancel()
        gate.release.set()
    assert len(ids(reader, "interactions")) == 16


# --------------------------------------------------------------------------- close, order


def test_close_commits_what_is_queued(writer: Writer, reader: Store) -> None:
    iid = seed_interaction(writer)
    gate = Gate(writer)
    for i in range(50):
        writer.log_interaction(make_interaction(f"chatcmpl-{i}"))
    futures = [writer.submit(add(iid, fid=f"fb-{i}")) for i in range(20)]
    gate.release.set()
    writer.close(timeout=TIMEOUT)
    assert all(f.done() for f in futures)
    assert {f.result().id for f in futures} == {f"fb-{i}" for i in range(20)}
    assert ids(reader, "interactions") == {iid} | {f"chatcmpl-{i}" for i in range(50)}
    assert len(ids(reader, "feedback")) == 20


def test_feedback_right_after_logging_always_finds_the_interaction(
    writer: Writer, reader: Store
) -> None:
    futures = []
    for i in range(300):
        iid = f"chatcmpl-{i}"
        assert writer.log_interaction(make_interaction(iid))
        futures.append(writer.submit(add(iid, rating=1)))
    for f in futures:
        f.result(TIMEOUT)  # raises UnknownInteraction if the order was not kept
    assert len(ids(reader, "feedback")) == 300


def test_a_cancelled_caller_does_not_kill_the_writer(writer: Writer, reader: Store) -> None:
    # A caller awaiting `Writer.call` that is cancelled (a client hanging up, a stop) cancels
    # its future; the writer once died setting a result on it, and every later write hung.
    import threading

    gate = threading.Event()
    blocker = writer.submit(lambda s: gate.wait(TIMEOUT))
    doomed = writer.submit(lambda s: seed_interaction_row(s, "chatcmpl-doomed"))
    assert doomed.cancel()
    gate.set()
    blocker.result(TIMEOUT)
    iid = seed_interaction(writer, "chatcmpl-after")
    assert iid in ids(reader, "interactions")
    assert "chatcmpl-doomed" not in ids(reader, "interactions")  # its caller gave up first


def seed_interaction_row(store: Store, iid: str) -> None:
    store.insert_interactions([make_interaction(iid)])
