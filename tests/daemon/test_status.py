"""`/admin/status` of the real app, built without vLLM (no lifespan runs): the store's
durability settings as SQLite reports them, and the schedule before its clock starts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.app import Daemon
from daemon.config import load_settings


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    for key in list(os.environ):
        if key.startswith("ADAPTD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(data_dir=tmp_path / "data", schedule={"enabled": True})
    d = Daemon(settings, model_source="/nonexistent")
    yield d
    d.writer.close()
    d.reader.close()
    d.store.close()


def test_status_reports_the_writers_journal_and_synchronous(daemon: Daemon) -> None:
    store = daemon.status()["store"]
    assert (store["journal_mode"], store["synchronous"]) == ("wal", "FULL")
    assert store["sqlite_version"].count(".") == 2


def test_status_before_the_schedule_starts(daemon: Daemon) -> None:
    nc = daemon.status()["next_cycle"]
    assert nc["at"] is None and nc["schedule"].startswith("every ")
    assert nc["would_start"] is False and nc["reason"] == "the model server is not ready"
