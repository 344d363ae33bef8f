"""The SQLite store: interactions, feedback, adapter versions, cycles and promotions.

One `Store` object wraps one connection. The daemon opens exactly one writable
store and hands it to the `Writer` thread (see `feedback.writer`); every other
reader opens its own store with ``readonly=True``. Store methods are verbs that
return dataclasses.

Durability: WAL journal with ``synchronous=FULL``: a transaction that returned
from ``COMMIT`` has been fsynced to the WAL, so it survives a crash of the
process *and* of the machine. The writer groups many small writes into one
transaction, so the fsync is paid once per batch, not once per feedback item.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils import Migrations

from feedback.errors import StoreBusy, StoreError, StoreFull, UnknownInteraction

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000

# Errors of a write that mean "no room": the disk (or a quota, or the process's file-size
# limit) is full. SQLite reports ENOSPC as SQLITE_FULL, and a write() refused with EDQUOT or
# EFBIG as SQLITE_IOERR_WRITE; the others are where the same lack of room shows up.
_NO_ROOM = {
    sqlite3.SQLITE_IOERR_WRITE,
    sqlite3.SQLITE_IOERR_FSYNC,
    sqlite3.SQLITE_IOERR_TRUNCATE,
    sqlite3.SQLITE_IOERR_SHMSIZE,
}


def write_error(e: sqlite3.Error) -> StoreError | StoreBusy:
    """The store's error for a failed write: `StoreBusy` (503) when another program holds the
    write lock past ``busy_timeout``, `StoreFull` (507) when the disk has no room, `StoreError`
    (500) otherwise. In every case nothing of the failed transaction was stored."""
    code = getattr(e, "sqlite_errorcode", None) or 0
    primary = code & 0xFF  # extended result codes keep the primary one in the low byte
    name = getattr(e, "sqlite_errorname", type(e).__name__)
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreBusy(f"the database is locked by another connection ({name}); retry shortly")
    if primary == sqlite3.SQLITE_FULL or code in _NO_ROOM:
        return StoreFull(
            f"the database could not be written ({name}: {e}): the disk is full or a write "
            "failed; nothing was stored, retry once there is room"
        )
    return StoreError(f"the database could not be written ({name}: {e})")


migrations = Migrations("adaptd")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["interactions"].create(  # type: ignore[union-attr]
        {
            "id": str,
            "created_at": float,
            "endpoint": str,  # chat | completion | external
            "model": str,  # what the caller asked for: adaptd, base or a version name
            "version": str,  # what served it: "base" or an adapter version
            "caller": str,  # key label of the caller, or "anonymous"
            "request": str,  # JSON: messages (chat) or prompt (completion)
            "params": str,  # JSON: sampling parameters
            "output": str,
            "finish_reason": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "latency_ms": float,
            "status": str,  # ok | aborted | error
            "stream": int,
        },
        pk="id",
        not_null={"created_at", "endpoint", "status"},
    )
    db["interactions"].create_index(["created_at"])  # type: ignore[union-attr]
    db["feedback"].create(  # type: ignore[union-attr]
        {
            "id": str,
            "interaction_id": str,
            "created_at": float,
            "rating": int,
            "correction": str,
            "comment": str,
            "user": str,
            "tags": str,  # JSON list
        },
        pk="id",
        foreign_keys=[("interaction_id", "interactions", "id")],
        not_null={"interaction_id", "created_at"},
    )
    db["feedback"].create_index(["interaction_id"])  # type: ignore[union-attr]
    db["feedback"].create_index(["created_at"])  # type: ignore[union-attr]
    db["adapter_versions"].create(  # type: ignore[union-attr]
        {
            "name": str,
            "created_at": float,
            "parent": str,
            "path": str,
            "sha256": str,
            "manifest": str,
        },
        pk="name",
    )
    db["promotions"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "at": float,
            "action": str,  # promote | rollback
            "version": str,  # None means the base model
            "previous": str,
            "actor": str,
            "reason": str,
        },
        pk="id",
    )
    db["cycles"].create(  # type: ignore[union-attr]
        {
            "id": str,
            "created_at": float,
            "updated_at": float,
            "state": str,
            "version": str,
            "decision": str,
            "reasons": str,
            "detail": str,
        },
        pk="id",
    )
    # The history tables are append-only: the database refuses edits.
    for table in ("promotions",):
        db.execute(
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'append-only table'); END"
        )
        db.execute(
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'append-only table'); END"
        )


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    names = ", ".join(f"[{c}]" for c in columns)
    return f"INSERT INTO [{table}] ({names}) VALUES ({', '.join(':' + c for c in columns)})"


@dataclass(frozen=True)
class Interaction:
    id: str
    created_at: float
    endpoint: str
    model: str
    version: str
    caller: str
    request: Any
    params: dict[str, Any]
    output: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    status: str = "ok"
    stream: bool = False

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["request"] = json.dumps(self.request)
        row["params"] = json.dumps(self.params)
        row["stream"] = int(self.stream)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Interaction:
        row = dict(row)
        row["request"] = json.loads(row["request"]) if row["request"] else None
        row["params"] = json.loads(row["params"]) if row["params"] else {}
        row["stream"] = bool(row["stream"])
        return cls(**row)

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages, whatever the endpoint was."""
        if self.endpoint == "completion":
            prompt = self.request
            if isinstance(prompt, list):
                prompt = "".join(str(p) for p in prompt)
            return [{"role": "user", "content": str(prompt)}]
        return list(self.request or [])


@dataclass(frozen=True)
class FeedbackInput:
    """One feedback item as received (already validated for shape)."""

    interaction_id: str | None = None
    messages: list[dict[str, Any]] | None = None
    response: str | None = None
    rating: int | None = None
    correction: str | None = None
    comment: str | None = None
    user: str | None = None
    tags: list[str] = field(default_factory=list)
    created_at: float | None = None
    id: str | None = None  # set by imports that keep the original id


@dataclass(frozen=True)
class Feedback:
    id: str
    interaction_id: str
    created_at: float
    rating: int | None
    correction: str | None
    comment: str | None
    user: str | None
    tags: list[str]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Feedback:
        row = dict(row)
        row["tags"] = json.loads(row["tags"]) if row["tags"] else []
        return cls(**row)


_INTERACTION_COLUMNS = [f.name for f in fields(Interaction)]
_FEEDBACK_COLUMNS = [f.name for f in fields(Feedback)]
_INSERT_INTERACTION = _insert_sql("interactions", _INTERACTION_COLUMNS)
_INSERT_FEEDBACK = _insert_sql("feedback", _FEEDBACK_COLUMNS)


@dataclass(frozen=True)
class FeedbackCounts:
    total: int
    positive: int
    negative: int
    neutral: int
    corrections: int
    interactions: int


@dataclass(frozen=True)
class Promotion:
    id: int
    at: float
    action: str
    version: str | None
    previous: str | None
    actor: str | None
    reason: str | None


@dataclass(frozen=True)
class Cycle:
    """One adaptation cycle: its state, its candidate and the decision with its reasons."""

    id: str
    created_at: float
    state: str  # queued curating training evaluating deciding promoting | done rejected ...
    updated_at: float = 0.0
    version: str | None = None
    decision: str | None = None  # promoted | rejected | awaiting_approval | failed
    reasons: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Cycle:
        return cls(
            **{
                **row,
                "reasons": json.loads(row["reasons"] or "[]"),
                "detail": json.loads(row["detail"] or "{}"),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HealthReport:
    sqlite_version: str
    quick_check: str
    wal_reset_bug: bool
    journal_mode: str = ""  # as this connection reads it: "wal" for the writing store
    synchronous: str = ""  # "OFF", "NORMAL", "FULL" or "EXTRA"


_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def synchronous_name(level: int) -> str:
    """`PRAGMA synchronous`'s number as SQLite's docs name it."""
    return _SYNCHRONOUS.get(level, str(level))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sqlite_has_wal_reset_bug(version: str) -> bool:
    """True for SQLite releases with the WAL-reset corruption bug.

    The bug (concurrent checkpoint and WAL reset by two connections can corrupt
    the database) exists from 3.7.0 and is fixed in 3.51.3, with back-ports to
    3.50.7 and 3.44.6.
    """
    parts = tuple(int(p) for p in version.split(".")[:3])
    v = parts + (0,) * (3 - len(parts))
    if v < (3, 7, 0) or v >= (3, 51, 3):
        return False
    if (3, 50, 7) <= v < (3, 51, 0):
        return False
    return not (3, 44, 6) <= v < (3, 45, 0)


class Store:
    """A connection to adaptd's database, with verbs that return dataclasses."""

    def __init__(
        self, path: Path, *, readonly: bool = False, busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        try:
            if readonly:
                uri = f"file:{self.path}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(str(self.path), check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the database at {self.path}: {e}") from e
        self.db = sqlite_utils.Database(conn)

    # -- lifecycle -------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""
        pending = [m.name for m in migrations.pending(self.db)]
        migrations.apply(self.db)
        return pending

    def check(self) -> HealthReport:
        """`PRAGMA quick_check` plus a warning for SQLite builds with known corruption bugs."""
        result = self.db.execute("PRAGMA quick_check").fetchall()
        text = "; ".join(r[0] for r in result)
        version = sqlite3.sqlite_version
        bug = sqlite_has_wal_reset_bug(version)
        if bug:
            log.warning(
                "the linked SQLite %s has the WAL-reset corruption bug (fixed in 3.51.3, "
                "3.50.7 and 3.44.6); adaptd keeps a single writing connection, which avoids "
                "the race, but upgrade SQLite (or Python) when you can",
                version,
            )
        if text != "ok":
            raise StoreError(f"the database at {self.path} failed quick_check: {text}")
        return HealthReport(
            sqlite_version=version,
            quick_check=text,
            wal_reset_bug=bug,
            journal_mode=str(self.db.execute("PRAGMA journal_mode").fetchone()[0]),
            synchronous=synchronous_name(int(self.db.execute("PRAGMA synchronous").fetchone()[0])),
        )

    def close(self) -> None:
        self.db.conn.close()

    # -- writes (called by the single writer) -----------------------------
    def insert_interactions(self, items: Sequence[Interaction]) -> None:
        # Plain SQL: sqlite-utils' insert() introspects the table on every call, which
        # costs more than the insert itself on the request path.
        if items:
            self.db.conn.executemany(_INSERT_INTERACTION, [i.to_row() for i in items])

    def add_feedback(self, item: FeedbackInput, *, now: float | None = None) -> Feedback:
        """Store one feedback item; an external conversation becomes an interaction first."""
        at = item.created_at if item.created_at is not None else (now or time.time())
        interaction_id = item.interaction_id
        if interaction_id is None:
            interaction_id = new_id("ext")
            self.insert_interactions(
                [
                    Interaction(
                        id=interaction_id,
                        created_at=at,
                        endpoint="external",
                        model="external",
                        version="external",
                        caller=item.user or "anonymous",
                        request=item.messages or [],
                        params={},
                        output=item.response or "",
                    )
                ]
            )
        elif not self.has_interaction(interaction_id):
            raise UnknownInteraction(interaction_id)
        fb = Feedback(
            id=item.id or new_id("fb"),
            interaction_id=interaction_id,
            created_at=at,
            rating=item.rating,
            correction=item.correction,
            comment=item.comment,
            user=item.user,
            tags=list(item.tags),
        )
        row = asdict(fb)
        row["tags"] = json.dumps(fb.tags)
        self.db.conn.execute(_INSERT_FEEDBACK, row)
        return fb

    def record_promotion(
        self, action: str, version: str | None, *, actor: str | None = None, reason: str = ""
    ) -> Promotion:
        with self.db.atomic():
            previous = self.promoted_version()
            self.db["promotions"].insert(  # type: ignore[union-attr]
                {
                    "at": time.time(),
                    "action": action,
                    "version": version,
                    "previous": previous,
                    "actor": actor,
                    "reason": reason,
                }
            )
        return self.promotions()[-1]

    def register_version(self, row: dict[str, Any]) -> None:
        """Record a version folder that was written (its name is never reused)."""
        with self.db.atomic():
            self.db["adapter_versions"].insert(row)  # type: ignore[union-attr]

    def put_cycle(self, cycle: Cycle) -> Cycle:
        """Insert or replace a cycle's row; returns it with ``updated_at`` set."""
        cycle = Cycle(**{**asdict(cycle), "updated_at": time.time()})
        row = asdict(cycle)
        row["reasons"] = json.dumps(cycle.reasons)
        row["detail"] = json.dumps(cycle.detail)
        with self.db.atomic():
            self.db["cycles"].upsert(row, pk="id")  # type: ignore[union-attr]
        return cycle

    # -- reads -------------------------------------------------------------
    def get_cycle(self, cycle_id: str) -> Cycle | None:
        rows = list(self.db["cycles"].rows_where("id = ?", [cycle_id]))
        return Cycle.from_row(rows[0]) if rows else None

    def cycles(self, *, limit: int = 100) -> list[Cycle]:
        return [
            Cycle.from_row(r)
            for r in self.db["cycles"].rows_where(order_by="created_at DESC", limit=limit)
        ]

    def feedback_count_since(self, since: float) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM feedback WHERE created_at > ?", [since])
        return int(row.fetchone()[0])

    def cycle_of_version(self, version: str) -> Cycle | None:
        rows = list(
            self.db["cycles"].rows_where("version = ?", [version], order_by="created_at DESC")
        )
        return Cycle.from_row(rows[0]) if rows else None

    def get_version(self, name: str) -> dict[str, Any] | None:
        rows = list(self.db["adapter_versions"].rows_where("name = ?", [name]))
        return rows[0] if rows else None

    def has_interaction(self, interaction_id: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM interactions WHERE id = ?", [interaction_id]
        ).fetchone()
        return row is not None

    def get_interaction(self, interaction_id: str) -> Interaction | None:
        rows = list(self.db["interactions"].rows_where("id = ?", [interaction_id]))
        return Interaction.from_row(rows[0]) if rows else None

    def interactions(self, *, since: float = 0.0, limit: int | None = None) -> list[Interaction]:
        return [
            Interaction.from_row(r)
            for r in self.db["interactions"].rows_where(
                "created_at >= ?", [since], order_by="created_at, id", limit=limit
            )
        ]

    def feedback(self, *, since: float = 0.0) -> list[Feedback]:
        return [
            Feedback.from_row(r)
            for r in self.db["feedback"].rows_where(
                "created_at >= ?", [since], order_by="created_at, id"
            )
        ]

    def iter_feedback_with_interactions(self) -> Iterator[tuple[Feedback, Interaction]]:
        sql = (
            "SELECT f.*, i.id AS i_id FROM feedback f JOIN interactions i "
            "ON f.interaction_id = i.id ORDER BY f.created_at, f.id"
        )
        cache: dict[str, Interaction] = {}
        for row in self.db.query(sql):
            row.pop("i_id")
            fb = Feedback.from_row(row)
            inter = cache.get(fb.interaction_id) or self.get_interaction(fb.interaction_id)
            assert inter is not None  # joined above
            cache[fb.interaction_id] = inter
            yield fb, inter

    def feedback_counts(self) -> FeedbackCounts:
        row = self.db.execute(
            "SELECT COUNT(*), "
            "COALESCE(SUM(rating = 1), 0), COALESCE(SUM(rating = -1), 0), "
            "COALESCE(SUM(rating = 0), 0), COALESCE(SUM(correction IS NOT NULL), 0) "
            "FROM feedback"
        ).fetchone()
        n_inter = self.db.execute("SELECT COUNT(*) FROM interactions").fetchone()[0]
        return FeedbackCounts(
            total=row[0],
            positive=row[1],
            negative=row[2],
            neutral=row[3],
            corrections=row[4],
            interactions=n_inter,
        )

    def promotions(self) -> list[Promotion]:
        return [Promotion(**r) for r in self.db["promotions"].rows_where(order_by="id")]

    def promoted_version(self) -> str | None:
        """The adapter version the `adaptd` alias serves (None: the base model)."""
        row = self.db.execute("SELECT version FROM promotions ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def version_names(self) -> list[str]:
        return [
            r[0] for r in self.db.execute("SELECT name FROM adapter_versions ORDER BY created_at")
        ]

    def versions(self) -> list[dict[str, Any]]:
        """Every registered version's row, oldest first (``manifest`` as its JSON text)."""
        return list(self.db["adapter_versions"].rows_where(order_by="created_at"))

    def unrated_chat_requests(self, limit: int = 5000) -> list[str]:
        """The request JSON of the newest answered chats that got no feedback (self-replay's
        prompts), newest first."""
        rows = self.db.execute(
            "SELECT i.request FROM interactions i LEFT JOIN feedback f ON f.interaction_id = i.id "
            "WHERE f.id IS NULL AND i.endpoint = 'chat' AND i.status = 'ok' "
            "ORDER BY i.created_at DESC LIMIT ?",
            [limit],
        ).fetchall()
        return [r[0] for r in rows]

    def cycle_versions(self) -> list[str]:
        """The version names that cycles have used (a failed cycle's name stays spent)."""
        return [
            r[0] for r in self.db.execute("SELECT version FROM cycles WHERE version IS NOT NULL")
        ]
