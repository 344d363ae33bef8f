"""`feedback.store.Store` on real SQLite files: migrations, pragmas, verbs, append-only history."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from feedback.errors import StoreError, UnknownInteraction
from feedback.store import (
    BUSY_TIMEOUT_MS,
    FeedbackCounts,
    FeedbackInput,
    Interaction,
    Store,
    sqlite_has_wal_reset_bug,
    synchronous_name,
)


def make_interaction(iid: str, *, at: float = 1000.0, output: str = "Paris.") -> Interaction:
    return Interaction(
        id=iid,
        created_at=at,
        endpoint="chat",
        model="adaptd",
        version="base",
        caller="anonymous",
        request=[{"role": "user", "content": "What is the capital of France?"}],
        params={"temperature": 0.0},
        output=output,
        finish_reason="stop",
        prompt_tokens=7,
        completion_tokens=2,
        latency_ms=12.5,
    )


@pytest.fixture()
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "adaptd.db"


@pytest.fixture()
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    s.migrate()
    yield s
    s.close()


def count(store: Store, table: str) -> int:
    return int(store.db.execute(f"SELECT COUNT(*) FROM [{table}]").fetchone()[0])


# --------------------------------------------------------------------------- opening


def test_migrations_apply_once_and_are_idempotent(db_path: Path) -> None:
    s = Store(db_path)
    try:
        applied = s.migrate()
        assert applied, "a fresh database must get the initial migration"
        assert s.migrate() == []
        tables = set(s.db.table_names())
        assert {"interactions", "feedback", "adapter_versions", "promotions", "cycles"} <= tables
        # The writer issues an explicit BEGIN: migrate() must not leave a transaction open.
        assert not s.db.conn.in_transaction
    finally:
        s.close()
    again = Store(db_path)
    try:
        assert again.migrate() == []
    finally:
        again.close()


def test_pragmas(store: Store) -> None:
    conn = store.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS > 0
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_foreign_keys_are_enforced(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError), store.db.atomic():
        store.db.execute(
            "INSERT INTO feedback (id, interaction_id, created_at) VALUES ('fb-1', 'nope', 1.0)"
        )
    assert count(store, "feedback") == 0


def test_check_reports_quick_check_ok(store: Store) -> None:
    report = store.check()
    assert report.quick_check == "ok"
    assert report.sqlite_version == sqlite3.sqlite_version
    assert report.wal_reset_bug == sqlite_has_wal_reset_bug(sqlite3.sqlite_version)
    assert (report.journal_mode, report.synchronous) == ("wal", "FULL")  # what the writer sets


def test_check_of_a_reader_reports_its_own_connection(tmp_path: Path) -> None:
    Store(tmp_path / "a.db").migrate()
    reader = Store(tmp_path / "a.db", readonly=True)
    try:
        report = reader.check()
        # the journal mode is the file's; synchronous is per connection (this build's default)
        assert report.journal_mode == "wal"
        assert report.synchronous in ("OFF", "NORMAL", "FULL", "EXTRA")
    finally:
        reader.close()


def test_synchronous_names() -> None:
    assert [synchronous_name(i) for i in range(4)] == ["OFF", "NORMAL", "FULL", "EXTRA"]
    assert synchronous_name(9) == "9"


@pytest.mark.parametrize(
    ("version", "has_bug"),
    [
        ("3.6.0", False),
        ("3.6.23", False),
        ("3.7.0", True),
        ("3.40.1", True),
        ("3.44.5", True),
        ("3.44.6", False),
        ("3.45.0", True),
        ("3.50.6", True),
        ("3.50.7", False),
        ("3.51.0", True),
        ("3.51.2", True),
        ("3.51.3", False),
        ("3.52.0", False),
    ],
)
def test_sqlite_has_wal_reset_bug(version: str, has_bug: bool) -> None:
    assert sqlite_has_wal_reset_bug(version) is has_bug


def test_readonly_store_of_a_missing_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "missing.db", readonly=True)


# --------------------------------------------------------------------------- feedback


def test_add_feedback_on_a_logged_interaction(store: Store) -> None:
    with store.db.atomic():
        store.insert_interactions([make_interaction("chatcmpl-1")])
        fb = store.add_feedback(
            FeedbackInput(
                interaction_id="chatcmpl-1", rating=-1, correction="Paris.", tags=["geo"]
            ),
            now=1234.5,
        )
    assert fb.interaction_id == "chatcmpl-1"
    assert fb.created_at == 1234.5
    assert fb.id.startswith("fb-")
    assert store.feedback() == [fb]
    inter = store.get_interaction("chatcmpl-1")
    assert inter == make_interaction("chatcmpl-1")


def test_add_feedback_with_unknown_interaction_stores_nothing(store: Store) -> None:
    with pytest.raises(UnknownInteraction) as err, store.db.atomic():
        store.add_feedback(FeedbackInput(interaction_id="chatcmpl-missing", rating=1))
    assert err.value.interaction_id == "chatcmpl-missing"
    assert "chatcmpl-missing" in str(err.value)
    assert count(store, "feedback") == 0
    assert count(store, "interactions") == 0


def test_external_feedback_creates_an_external_interaction(store: Store) -> None:
    messages = [{"role": "user", "content": "2+2?"}]
    with store.db.atomic():
        fb = store.add_feedback(
            FeedbackInput(messages=messages, response="5", rating=-1, correction="4", user="ana")
        )
    inter = store.get_interaction(fb.interaction_id)
    assert inter is not None
    assert inter.endpoint == "external"
    assert inter.id.startswith("ext-")
    assert inter.messages() == messages
    assert inter.output == "5"
    assert inter.caller == "ana"
    assert count(store, "interactions") == 1


def test_completion_interaction_reads_as_one_user_message(store: Store) -> None:
    inter = Interaction(
        id="cmpl-1",
        created_at=1.0,
        endpoint="completion",
        model="base",
        version="base",
        caller="anonymous",
        request=["Once upon", " a time"],
        params={},
        output=" there was",
    )
    with store.db.atomic():
        store.insert_interactions([inter])
    got = store.get_interaction("cmpl-1")
    assert got is not None
    assert got.messages() == [{"role": "user", "content": "Once upon a time"}]


def test_feedback_counts(store: Store) -> None:
    with store.db.atomic():
        store.insert_interactions([make_interaction(f"chatcmpl-{i}") for i in range(3)])
        for rating, correction in [(1, None), (1, None), (-1, "Lyon."), (0, None), (None, "x")]:
            store.add_feedback(
                FeedbackInput(
                    interaction_id="chatcmpl-0",
                    rating=rating,
                    correction=correction,
                    comment=None if rating is not None or correction else "c",
                )
            )
        store.add_feedback(FeedbackInput(interaction_id="chatcmpl-1", comment="meh"))
    assert store.feedback_counts() == FeedbackCounts(
        total=6, positive=2, negative=1, neutral=1, corrections=2, interactions=3
    )


def test_feedback_counts_of_an_empty_store(store: Store) -> None:
    assert store.feedback_counts() == FeedbackCounts(0, 0, 0, 0, 0, 0)


# --------------------------------------------------------------------------- promotions


def test_promoted_version_follows_the_last_promotion(store: Store) -> None:
    assert store.promoted_version() is None
    p1 = store.record_promotion("promote", "v1", actor="cycle", reason="passed")
    assert store.promoted_version() == "v1"
    assert p1.previous is None
    p2 = store.record_promotion("promote", "v2")
    assert (store.promoted_version(), p2.previous) == ("v2", "v1")
    p3 = store.record_promotion("rollback", "v1", actor="admin")
    assert (store.promoted_version(), p3.previous, p3.action) == ("v1", "v2", "rollback")
    store.record_promotion("rollback", None)
    assert store.promoted_version() is None
    assert [p.version for p in store.promotions()] == ["v1", "v2", "v1", None]
    ids = [p.id for p in store.promotions()]
    assert ids == sorted(ids)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE promotions SET version = 'evil'",
        "UPDATE promotions SET reason = 'rewritten' WHERE id = 1",
        "DELETE FROM promotions",
        "DELETE FROM promotions WHERE id = 1",
    ],
)
def test_promotions_are_append_only(store: Store, sql: str) -> None:
    store.record_promotion("promote", "v1", reason="first")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"), store.db.atomic():
        store.db.execute(sql)
    (row,) = store.promotions()
    assert (row.version, row.reason) == ("v1", "first")
    # Inserting still works after a refused edit.
    store.record_promotion("promote", "v2")
    assert [p.version for p in store.promotions()] == ["v1", "v2"]


# --------------------------------------------------------------------------- readers, reopening


def test_readonly_store_cannot_write(store: Store, db_path: Path) -> None:
    with store.db.atomic():
        store.insert_interactions([make_interaction("chatcmpl-1")])
    ro = Store(db_path, readonly=True)
    try:
        assert ro.has_interaction("chatcmpl-1")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.db.execute("DELETE FROM interactions")
        with pytest.raises((sqlite3.Error, StoreError)):
            ro.add_feedback(FeedbackInput(interaction_id="chatcmpl-1", rating=1))
        with pytest.raises((sqlite3.Error, StoreError)):
            ro.insert_interactions([make_interaction("chatcmpl-2")])
    finally:
        ro.close()
    assert store.has_interaction("chatcmpl-1")
    assert not store.has_interaction("chatcmpl-2")
    assert count(store, "feedback") == 0


def test_readonly_store_sees_commits_of_the_writer(store: Store, db_path: Path) -> None:
    ro = Store(db_path, readonly=True)
    try:
        assert ro.feedback_counts().interactions == 0
        with store.db.atomic():
            store.insert_interactions([make_interaction("chatcmpl-1")])
        assert ro.feedback_counts().interactions == 1
    finally:
        ro.close()


def test_data_survives_closing_and_reopening(db_path: Path) -> None:
    s = Store(db_path)
    s.migrate()
    with s.db.atomic():
        s.insert_interactions([make_interaction("chatcmpl-1", at=5.0)])
        fb = s.add_feedback(FeedbackInput(interaction_id="chatcmpl-1", rating=1, tags=["a", "b"]))
    s.record_promotion("promote", "v1")
    s.close()

    again = Store(db_path)
    try:
        assert again.migrate() == []
        assert again.feedback() == [fb]
        assert again.get_interaction("chatcmpl-1") == make_interaction("chatcmpl-1", at=5.0)
        assert again.promoted_version() == "v1"
        assert again.check().quick_check == "ok"
    finally:
        again.close()
