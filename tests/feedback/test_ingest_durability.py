"""The ingest benchmark's durability check: every acknowledged id is looked up, one by one."""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def ingest() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "feedback_ingest", ROOT / "benchmarks" / "feedback_ingest.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def db_with(tmp_path: Path, ids: list[str]) -> Path:
    db = tmp_path / "adaptd.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE feedback (id TEXT PRIMARY KEY)")
        conn.executemany("INSERT INTO feedback VALUES (?)", [(i,) for i in ids])
    return db


def test_every_acknowledged_id_stored_is_durable(tmp_path: Path) -> None:
    db = db_with(tmp_path, ["a", "b", "c", "extra"])
    got = ingest().durability(db, ["a", "b", "c"], responses_2xx=3)
    assert got["acknowledged_missing"] == 0
    assert got["every_201_stored"] is True


def test_a_lost_id_is_named_even_when_an_unacknowledged_row_keeps_the_count(tmp_path: Path) -> None:
    db = db_with(tmp_path, ["a", "c", "unacked"])  # same row count as the acknowledged ids
    got = ingest().durability(db, ["a", "b", "c"], responses_2xx=3)
    assert (got["acknowledged_missing"], got["missing_examples"]) == (1, ["b"])
    assert got["every_201_stored"] is False


def test_a_2xx_that_named_no_id_fails_the_check(tmp_path: Path) -> None:
    db = db_with(tmp_path, ["a", "b"])
    got = ingest().durability(db, ["a", "b"], responses_2xx=3)
    assert got["every_201_stored"] is False


def test_a_run_with_nothing_acknowledged_is_not_durable(tmp_path: Path) -> None:
    got = ingest().durability(db_with(tmp_path, []), [], responses_2xx=0)
    assert got["every_201_stored"] is False
