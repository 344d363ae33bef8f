"""Writing a version folder when the disk fills up half-way: nothing half-written is left."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from daemon.versions import Manifest, staging_dir, write_staged


def test_a_version_folder_that_cannot_be_written_leaves_nothing(tmp_path: Path) -> None:
    adapters, src, work = tmp_path / "adapters", tmp_path / "adapter", tmp_path / "work"
    for d in (adapters, src, work):
        d.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"\0" * 4096)

    manifest = Manifest(version="v0001", created_at=1.0, parent=None, base_model="tiny")

    def disk_full(path: Path) -> None:
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(OSError, match="No space left"):
        write_staged(adapters, manifest, src, work, {"x.jsonl": disk_full})
    assert list(adapters.iterdir()) == []  # it used to leave adapters/.tmp.v0001.<pid>/
    assert not staging_dir(adapters, "v0001").exists()
    # the next try of the same version (a resumed cycle) is not blocked by any leftover
    path, _ = write_staged(adapters, manifest, src, work, {})
    assert path == staging_dir(adapters, "v0001") and (path / "manifest.json").is_file()
