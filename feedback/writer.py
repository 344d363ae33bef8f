"""The single writer: one thread owns the writable connection and group-commits.

Why one thread: SQLite allows one writer at a time; funnelling every write
through one connection avoids ``SQLITE_BUSY`` between our own writers and lets
many small writes share one transaction (one fsync) under load.

The queue is bounded (``max_pending`` jobs). What happens when it is full:

* interaction logs are *dropped* at once and counted (``dropped``, exported as
  ``adaptd_interaction_log_dropped_total``): serving never waits for the disk;
* feedback and other acknowledged writes are *refused* at once with
  `StoreBusy` (HTTP 503), so the client knows to retry: a 201 is never sent for
  a write that was not committed.

Jobs run in arrival order, so feedback on an interaction that was logged before
the response went out always finds its interaction row.

When the database cannot take a batch, every acknowledged write in it fails with the
store's error and the interaction logs in it are counted as failed
(``adaptd_interaction_log_failed_total``): `StoreBusy` (503) when another program holds
the write lock past the busy timeout, `StoreFull` (507) when the disk has no room. The
writer carries on; the next batch succeeds once the lock is released or room is made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from feedback.errors import FeedbackError, StoreBusy, StoreError
from feedback.store import Interaction, Store, write_error

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()


@dataclass
class WriterStats:
    logged: int = 0
    dropped: int = 0
    failed: int = 0
    commits: int = 0
    jobs: int = 0
    pending: int = 0


@dataclass
class _Call:
    fn: Callable[[Store], Any]
    future: concurrent.futures.Future[Any]


class Writer:
    """Owns a writable `Store` on a dedicated thread; see the module docstring."""

    def __init__(self, store: Store, *, max_pending: int = 10_000, max_batch: int = 1024) -> None:
        self._store = store
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._max_batch = max_batch
        self._stats = WriterStats()
        self._lock = threading.Lock()
        self._closed = False
        self._failures: dict[str, tuple[float, int]] = {}  # error code: (last logged, since)
        self._thread = threading.Thread(target=self._run, name="adaptd-writer", daemon=True)
        self._thread.start()

    # -- producers -----------------------------------------------------------
    def log_interaction(self, item: Interaction) -> bool:
        """Queue an interaction for logging; never blocks. False when it was dropped."""
        if self._closed:
            with self._lock:
                self._stats.dropped += 1
            return False
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            with self._lock:
                self._stats.dropped += 1
                dropped = self._stats.dropped
            if dropped == 1 or dropped % 1000 == 0:
                log.warning("interaction log queue full: %d interactions dropped so far", dropped)
            return False

    def submit(self, fn: Callable[[Store], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(store)`` in the writer's transaction; the future resolves after COMMIT."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._check_open()
        try:
            self._queue.put_nowait(_Call(fn, fut))
        except queue.Full:
            raise StoreBusy("the store's write queue is full; retry shortly") from None
        return fut

    async def call(self, fn: Callable[[Store], T]) -> T:
        """`submit` for coroutines: awaits the commit."""
        return await asyncio.wrap_future(self.submit(fn))

    def call_sync(self, fn: Callable[[Store], T], timeout: float | None = 60.0) -> T:
        return self.submit(fn).result(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Block until everything queued before this call is committed (waits for room)."""
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._check_open()
        self._queue.put(_Call(lambda store: None, fut), timeout=timeout)
        fut.result(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store's writer is closed (the daemon is stopping)")

    def stats(self) -> WriterStats:
        with self._lock:
            s = WriterStats(**vars(self._stats))
        s.pending = self._queue.qsize()
        return s

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        if not self._thread.is_alive():
            return
        self._closed = True
        self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the writer did not finish within %.0f s", timeout)

    # -- the thread ----------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(job is _STOP for job in batch):
                stop = True
                batch = [job for job in batch if job is not _STOP]
            if batch:
                self._commit(batch)

    def _run_job(
        self, conn: Any, job: _Call
    ) -> tuple[concurrent.futures.Future[Any], Any, BaseException | None]:
        """One job in a savepoint: a failing job undoes only its own writes."""
        conn.execute("SAVEPOINT job")
        try:
            value = job.fn(self._store)
        except Exception as e:
            if not conn.in_transaction:
                raise  # SQLite rolled the whole batch back (disk full, I/O): it fails as one
            conn.execute("ROLLBACK TO SAVEPOINT job")
            conn.execute("RELEASE SAVEPOINT job")
            if isinstance(e, sqlite3.Error):
                log.error("write job failed: %s", e)
                e = write_error(e)
            elif not isinstance(e, FeedbackError):
                log.exception("write job failed")
                e = StoreError(f"write failed: {e}")
            return job.future, None, e
        conn.execute("RELEASE SAVEPOINT job")
        return job.future, value, None

    def _commit(self, batch: Sequence[Any]) -> None:
        inters = [j for j in batch if isinstance(j, Interaction)]
        results: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        conn = self._store.db.conn
        started = time.perf_counter()
        try:
            if conn.in_transaction:  # left open by a ROLLBACK that failed
                conn.execute("ROLLBACK")
            # IMMEDIATE: take the write lock now, waiting up to busy_timeout for another
            # program's writer, rather than fail each job on its first write.
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Interactions first: feedback in the same batch may name them.
                self._store.insert_interactions(inters)
                for job in batch:
                    # A job whose caller gave up (its future was cancelled) is skipped;
                    # once running, a future can no longer be cancelled under us.
                    if isinstance(job, _Call) and job.future.set_running_or_notify_cancel():
                        results.append(self._run_job(conn, job))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as e:  # the batch failed as one: locked, disk full, I/O error
            err = (
                write_error(e)
                if isinstance(e, sqlite3.Error)
                else StoreError(f"the database could not commit: {e}")
            )
            self._log_failure(len(batch), err)
            with self._lock:
                self._stats.failed += len(inters)
            for job in batch:
                if not isinstance(job, _Call) or job.future.done():
                    continue
                if job.future.running() or job.future.set_running_or_notify_cancel():
                    job.future.set_exception(err)
            return
        with self._lock:
            self._stats.logged += len(inters)
            self._stats.commits += 1
            self._stats.jobs += len(batch)
        for fut, value, exc in results:
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)
        elapsed = time.perf_counter() - started
        if elapsed > 1.0:
            log.warning("a write batch of %d took %.2f s", len(batch), elapsed)
        if self._failures:
            log.info("the database takes writes again")
            self._failures.clear()

    def _log_failure(self, n: int, err: Exception) -> None:
        """One line per kind of failure every 30 s: a full disk must not fill the log too."""
        code = str(getattr(err, "code", "error"))
        now = time.monotonic()
        last, since = self._failures.get(code, (-1e9, 0))
        if now - last < 30.0:
            self._failures[code] = (last, since + 1)
            return
        more = f" ({since} more failed batches since the last report)" if since else ""
        log.error("a write batch of %d failed: %s%s", n, err, more)
        self._failures[code] = (now, 0)
