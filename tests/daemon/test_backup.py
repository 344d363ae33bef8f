"""`adaptd backup` while a writer keeps writing, and a restore: the copy is a data directory
the daemon's store opens, with every row acknowledged before the backup and every version."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon.backup import BackupError, backup
from feedback.store import FeedbackInput, Interaction, Store
from feedback.writer import Writer

ROOT = Path(__file__).resolve().parents[2]


def interaction(iid: str) -> Interaction:
    return Interaction(id=iid, created_at=time.time(), endpoint="chat", model="adaptd",
                       version="base", caller="t", request=[{"role": "user", "content": iid}],
                       params={}, output="a")  # fmt: skip


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "adapters" / "v0001" / "state").mkdir(parents=True)
    (d / "adapters" / "v0001" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (d / "adapters" / "v0001" / "state" / "holdout.jsonl").write_text("{}\n")
    (d / "adapters" / ".staging.v0002").mkdir()
    (d / "reports" / "v0001").mkdir(parents=True)
    (d / "reports" / "v0001" / "report.json").write_text("{}")
    store = Store(d / "adaptd.db")
    store.migrate()
    writer = Writer(store)  # the store's writes commit through its writer, as in the daemon

    def fill(s: Store) -> None:
        s.insert_interactions([interaction(f"i{n}") for n in range(200)])
        for n in range(200):
            s.add_feedback(FeedbackInput(interaction_id=f"i{n}", rating=1))
        s.register_version({"name": "v0001", "created_at": 1.0, "parent": None,
                            "path": "adapters/v0001", "sha256": "x", "manifest": "{}"})  # fmt: skip
        s.record_promotion("promote", "v0001", actor="t")

    writer.call_sync(fill)
    writer.close()
    store.close()
    return d


def test_backup_under_writes_restores_everything_acknowledged(data: Path, tmp_path: Path) -> None:
    store = Store(data / "adaptd.db")
    writer = Writer(store)
    stop = threading.Event()
    acked: list[str] = []

    def keep_writing() -> None:
        n = 0
        while not stop.is_set():
            iid = f"live{n}"
            writer.log_interaction(interaction(iid))
            fb = writer.call_sync(
                lambda s, iid=iid: s.add_feedback(FeedbackInput(interaction_id=iid, rating=-1))
            )
            acked.append(fb.id)
            n += 1

    t = threading.Thread(target=keep_writing)
    t.start()
    try:
        time.sleep(0.3)
        before = list(acked)
        result = backup(data, tmp_path / "copy", pages_per_step=4)
    finally:
        stop.set()
        t.join(30)
        writer.close()
        store.close()

    copy = tmp_path / "copy"
    assert result.versions == ["v0001"] and result.reports == 1
    assert json.loads((copy / "backup.json").read_text())["rows"]["promotions"] == 1
    assert not (copy / "adapters" / ".staging.v0002").exists()
    assert sha(copy / "adapters/v0001/adapter_model.safetensors") == sha(
        data / "adapters/v0001/adapter_model.safetensors"
    )
    restored = Store(copy / "adaptd.db")
    try:
        assert restored.migrate() == []  # already current
        assert restored.check().quick_check == "ok"
        have = {r[0] for r in restored.db.execute("SELECT id FROM feedback")}
        assert set(before) <= have  # every feedback acknowledged before the backup began
        assert restored.feedback_counts().total >= 200 + len(before)
        assert restored.promoted_version() == "v0001"
    finally:
        restored.close()


def test_backup_refuses_bad_destinations(data: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(BackupError, match="not empty"):
        backup(data, tmp_path / "full")
    with pytest.raises(BackupError, match="inside the data directory"):
        backup(data, data / "backups" / "b1")
    with pytest.raises(BackupError, match=r"no adaptd\.db"):
        backup(tmp_path / "full", tmp_path / "elsewhere")


def test_backup_command(data: Path, tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "backup", str(tmp_path / "b"), "--data-dir", str(data), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["versions"] == ["v0001"] and out["rows"]["feedback"] == 200
    again = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "backup", str(tmp_path / "b"), "--data-dir", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 1 and "not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
