"""A version's folder and manifest (`daemon.versions`): the manifest reads back what older
releases wrote, a version is staged then finalized in place, and names are never reused."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.versions import (
    DataUsed,
    Manifest,
    Metrics,
    State,
    Verdict,
    finalize,
    lineage,
    next_name,
    registration,
    sha256_of,
    staging_dir,
    write_jsonl,
    write_staged,
)

# A judged manifest as the daemon wrote it before the type existed (keys as in the files).
OLD = {
    "version": "v0002",
    "created_at": 10.5,
    "parent": "v0001",
    "base_model": "/models/tiny",
    "settings": {"training": {"lr": 0.001}},
    "data": {
        "feedback_since": 1.0, "feedback_until": 9.0, "feedback_ids": ["a", "b"],
        "curation": {"received": 2}, "replay": {"self": 3}, "self_replay_from": "v0001",
        "train_examples": 2, "rewritten_examples": 0, "carried_examples": 1,
        "carried_from": "v0001", "holdout_examples": 0,
    },
    "metrics": {
        "training": {"steps": 4, "final_loss": 1.5}, "training_restarts": 0,
        "evaluation": {"general_nll": 2.0}, "table": [{"section": "task", "name": "x"}],
        "probe": {"items": [1]}, "serving_cost": None,
    },
    "decision": {
        "passed": True, "mode": "auto", "reasons": ["pass taught"], "current": "v0001",
        "serving_cost": None, "outcome": "promoted",
    },
    "libraries": {"torch": "2.13.0"},
    "files": {"adapter_model.safetensors": "ab"},
}  # fmt: skip


def test_a_manifest_reads_and_writes_the_same_keys_as_before() -> None:
    m = Manifest.from_dict(OLD)
    assert m.data.carried_from == "v0001" and m.metrics.training["steps"] == 4
    assert m.decision is not None and m.decision.passed and m.decision.outcome == "promoted"
    assert m.to_dict() == OLD
    assert Manifest.from_json(json.dumps(OLD)) == m


def test_a_candidate_says_so_and_has_no_evaluation_keys() -> None:
    m = Manifest(version="v0001", created_at=1.0, parent=None, base_model="tiny",
                 metrics=Metrics(training={"steps": 2}, training_restarts=1))  # fmt: skip
    d = m.to_dict()
    assert d["decision"] == "candidate"
    assert d["metrics"] == {"training": {"steps": 2}, "training_restarts": 1}
    assert Manifest.from_dict(d) == m


def test_missing_and_null_fields_read_as_their_defaults() -> None:
    m = Manifest.from_dict({"version": "v0003", "data": {"carried_from": None}, "metrics": None})
    assert m.parent is None and m.data == DataUsed() and m.metrics == Metrics()
    assert m.decision is None and m.files == {}
    failed = Manifest.from_dict({"version": "v0004", "decision": {"outcome": "failed",
                                                                  "reasons": ["boom"]}})  # fmt: skip
    assert failed.decision == Verdict(False, None, ["boom"], None, None, "failed")


def _adapter(tmp: Path) -> tuple[Path, Path, Path]:
    adapters, src, work = tmp / "adapters", tmp / "adapter", tmp / "work"
    for d in (adapters, src, work):
        d.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    (src / State.EWC).write_bytes(b"\2" * 8)
    (work / "progress.jsonl").write_text('{"step": 1}\n')
    return adapters, src, work


def test_a_version_is_staged_with_checksums_then_finalized_and_registered(tmp_path: Path) -> None:
    adapters, src, work = _adapter(tmp_path)
    m = Manifest(version="v0001", created_at=2.0, parent=None, base_model="tiny")
    rows = [{"q": 1}]
    staged, written = write_staged(
        adapters, m, src, work, {State.HOLDOUT: lambda p: write_jsonl(p, rows)}
    )
    assert staged == staging_dir(adapters, "v0001")
    assert (staged / "state" / State.EWC).is_file() and (
        staged / "state" / State.TRAIN_LOG
    ).is_file()
    assert set(written.files) == {
        "adapter_config.json", "adapter_model.safetensors",
        f"state/{State.EWC}", f"state/{State.TRAIN_LOG}", f"state/{State.HOLDOUT}",
    }  # fmt: skip
    for rel, digest in written.files.items():
        assert sha256_of(staged / rel) == digest
    assert Manifest.read(staged) == written

    judged = written.judged(
        Metrics(table=[]), Verdict(True, "auto", ["ok"], None, None, "promoted")
    )
    final = finalize(adapters, judged)
    assert final == adapters / "v0001" and not staged.exists()
    assert Manifest.read(final) == judged
    row = registration(adapters, judged, final)
    assert row["path"] == "adapters/v0001" and row["sha256"] == sha256_of(
        final / "adapter_model.safetensors"
    )
    assert json.loads(row["manifest"])["decision"]["outcome"] == "promoted"


def test_names_are_never_reused_and_lineage_follows_parents(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    assert next_name([], adapters) == "v0001"
    adapters.mkdir()
    (adapters / ".staging.v0004").mkdir()  # staged by a cycle that crashed
    assert next_name(["v0001", None, "v0002"], adapters) == "v0005"
    for v, parent in (("v0001", None), ("v0002", "v0001"), ("v0003", "v0002")):
        (adapters / v).mkdir()
        (adapters / v / "manifest.json").write_text(
            Manifest(version=v, created_at=1.0, parent=parent, base_model="t").to_json()
        )
    assert [v for v, _ in lineage(adapters, "v0003")] == ["v0003", "v0002", "v0001"]
    assert lineage(adapters, "v0009") == []
