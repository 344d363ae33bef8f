"""`adaptd backup`: a consistent copy of a data directory, safe while the daemon runs.

The database is copied with SQLite's online backup API (a consistent snapshot even while the
daemon writes; WAL readers never block the writer), then checked with
``PRAGMA integrity_check``. Adapter folders and reports are copied after it: version folders
are never edited once written, so every version the copied database names is complete in the
copy (staging folders of a running cycle are left out). The result is itself a data
directory: restoring is starting the daemon on it (`--data-dir`), or copying it back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class BackupError(Exception):
    pass


@dataclass(frozen=True)
class BackupResult:
    path: str
    seconds: float
    database_bytes: int
    versions: list[str]
    reports: int
    rows: dict[str, int]


def backup(data_dir: Path, dest: Path, *, pages_per_step: int = 1024) -> BackupResult:
    """Copy ``data_dir`` to ``dest`` (which must not exist or be empty)."""
    t0 = time.perf_counter()
    db = data_dir / "adaptd.db"
    if not db.is_file():
        raise BackupError(f"{data_dir} holds no adaptd.db: is it an adaptd data directory?")
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} exists and is not empty; name a new folder")
    if dest.resolve().is_relative_to(data_dir.resolve()):
        raise BackupError("the backup cannot go inside the data directory it copies")
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    out = sqlite3.connect(tmp / "adaptd.db")
    try:
        src.backup(out, pages=pages_per_step)
        out.execute("PRAGMA journal_mode=WAL")
        check = out.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise BackupError(f"the copied database fails its integrity check: {check}")
        rows = {
            t: out.execute(f"SELECT COUNT(*) FROM [{t}]").fetchone()[0]
            for t in ("interactions", "feedback", "adapter_versions", "promotions", "cycles")
        }
        versions = [r[0] for r in out.execute("SELECT name FROM adapter_versions ORDER BY name")]
    finally:
        out.close()
        src.close()

    missing = []
    for v in versions:
        folder = data_dir / "adapters" / v
        if folder.is_dir():
            shutil.copytree(folder, tmp / "adapters" / v, symlinks=True)
        else:
            missing.append(v)
    if missing:
        log.warning("versions without a folder in %s: %s", data_dir, ", ".join(missing))
    reports = 0
    if (data_dir / "reports").is_dir():
        shutil.copytree(data_dir / "reports", tmp / "reports")
        reports = sum(1 for p in (tmp / "reports").iterdir() if p.is_dir())
    result = BackupResult(
        path=str(dest),
        seconds=round(time.perf_counter() - t0, 3),
        database_bytes=(tmp / "adaptd.db").stat().st_size,
        versions=versions,
        reports=reports,
        rows=rows,
    )
    (tmp / "backup.json").write_text(
        json.dumps({**asdict(result), "created_at": time.time(), "source": str(data_dir)}, indent=2)
    )
    if dest.exists():
        dest.rmdir()
    os.rename(tmp, dest)
    return result
