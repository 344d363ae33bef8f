"""The report's "Forgetting across versions": each version once, this cycle's last."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from daemon.cycle import _history, _history_row
from feedback.store import Store


def version(store: Store, name: str, created: float, nll: float) -> None:
    manifest = {"metrics": {"evaluation": {"general_nll": nll}}}
    store.register_version({"name": name, "created_at": created, "parent": None,
                            "path": f"adapters/{name}", "sha256": "x",
                            "manifest": json.dumps(manifest)})  # fmt: skip


def test_this_cycles_version_is_listed_once_in_place_of_its_row(tmp_path: Path) -> None:
    store = Store(tmp_path / "adaptd.db")
    store.migrate()
    version(store, "v0001", 1.0, 0.70)
    store.record_promotion("promote", "v0001", actor="t")
    version(store, "v0002", 2.0, 0.69)  # this cycle's, registered before its report is built
    deps: Any = SimpleNamespace(reader=store)
    this = _history_row("v0002", 2.0, True, {"general_nll": 0.68})
    rows = _history(deps, this)
    assert [(r["version"], r["promoted"], r["general_nll"]) for r in rows] == [
        ("v0001", True, 0.70),
        ("v0002", True, 0.68),  # this evaluation's scores, not the stored manifest's
    ]
    # a candidate that was not promoted, not yet registered: appended, not promoted
    rows = _history(deps, _history_row("v0003", 3.0, False, {"general_nll": 0.71}))
    assert [(r["version"], r["promoted"]) for r in rows] == [
        ("v0001", True), ("v0002", False), ("v0003", False)
    ]  # fmt: skip
    # re-rendered after a later promotion: the promotions table says so
    store.record_promotion("promote", "v0002", actor="t")
    rows = _history(deps, _history_row("v0002", 2.0, False, {}))
    assert [(r["version"], r["promoted"]) for r in rows] == [("v0001", True), ("v0002", True)]
    store.close()
