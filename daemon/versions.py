"""One adapter version's folder and its manifest: the only module that knows their layout.

``adapters/<version>/`` holds what vLLM loads (``adapter_config.json``,
``adapter_model.safetensors``), ``manifest.json`` (a `Manifest`: settings, parent, data used,
metrics, decision, library versions, file hashes) and ``state/`` (`State`: the EWC state, the
replay reservoir, the cycle's training set and holdout, the loss log) that the next cycle and
the evaluation read.

A candidate is assembled in ``.tmp.<version>.<pid>``, fsynced and renamed to
``.staging.<version>`` (`write_staged`); once judged, its manifest gains the metrics and the
decision and the folder is renamed to ``<version>`` (`finalize`). Names are never reused and
final folders are never edited. Manifests written before this module (plain dicts with the
same keys) read back the same way: `Manifest.from_dict` tolerates missing keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

VERSION_RE = re.compile(r"^v(\d{4,})$")
_VERSION_IN = re.compile(r"(?:^|\.)v(\d{4,})(?:\.|$)")
MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = ("adapter_config.json", WEIGHTS)


class State:
    """File names under a version's ``state/`` folder."""

    EWC = "ewc.safetensors"
    TRAIN_LOG = "train_log.jsonl"
    RESERVOIR = "reservoir.jsonl"
    RESERVOIR_META = "reservoir.json"
    HOLDOUT = "holdout.jsonl"
    TRAIN = "train.jsonl"
    REPLAY = "replay.jsonl"
    EVAL_ONLY = "eval_only.jsonl"


def _dict(x: object) -> dict[str, Any]:
    return dict(x) if isinstance(x, dict) else {}


@dataclass(frozen=True)
class DataUsed:
    """What a version was trained on: the feedback window and the curated counts."""

    feedback_since: float = 0.0
    feedback_until: float = 0.0
    feedback_ids: list[str] = field(default_factory=list)
    curation: dict[str, Any] = field(default_factory=dict)  # the curation report
    replay: dict[str, int] = field(default_factory=dict)  # replayed examples per pool
    self_replay_from: str = "base"
    train_examples: int = 0
    rewritten_examples: int = 0  # taught as the served version's rewrite
    carried_examples: int = 0  # held out by the parent, trained now
    carried_from: str | None = None
    holdout_examples: int = 0

    @classmethod
    def from_dict(cls, d: object) -> DataUsed:
        d = _dict(d)
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None}
        return cls(**known)


@dataclass(frozen=True)
class Metrics:
    """Training's result, then (once judged) evaluation's record, its metric table, the
    promotion probe and the serving cost."""

    training: dict[str, Any] = field(default_factory=dict)
    training_restarts: int = 0
    evaluation: dict[str, Any] | None = None
    table: list[dict[str, Any]] | None = None
    probe: dict[str, Any] | None = None
    serving_cost: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "training": self.training,
            "training_restarts": self.training_restarts,
        }
        if self.table is not None:  # judged: the evaluation's keys are written, None or not
            out |= {
                "evaluation": self.evaluation,
                "table": self.table,
                "probe": self.probe,
                "serving_cost": self.serving_cost,
            }
        return out

    @classmethod
    def from_dict(cls, d: object) -> Metrics:
        d = _dict(d)
        table = d.get("table")
        return cls(
            training=_dict(d.get("training")),
            training_restarts=int(d.get("training_restarts") or 0),
            evaluation=d.get("evaluation") if isinstance(d.get("evaluation"), dict) else None,
            table=list(table) if isinstance(table, list) else None,
            probe=d.get("probe") if isinstance(d.get("probe"), dict) else None,
            serving_cost=d.get("serving_cost") if isinstance(d.get("serving_cost"), dict) else None,
        )


@dataclass(frozen=True)
class Verdict:
    """The gate's decision as the manifest keeps it (the checks themselves are in the report)."""

    passed: bool
    mode: str | None  # the gate's mode (None: the cycle failed before the gate)
    reasons: list[str]
    current: str | None  # the version the candidate was to replace
    serving_cost: dict[str, Any] | None
    outcome: str  # promoted, awaiting_approval, rejected or failed

    @classmethod
    def from_dict(cls, d: object) -> Verdict | None:
        """None for a candidate not yet judged (its manifest says ``"candidate"``)."""
        if not isinstance(d, dict):
            return None
        return cls(
            passed=bool(d.get("passed")),
            mode=d.get("mode"),
            reasons=[str(r) for r in d.get("reasons") or []],
            current=d.get("current"),
            serving_cost=d.get("serving_cost") if isinstance(d.get("serving_cost"), dict) else None,
            outcome=str(d.get("outcome") or ""),
        )


@dataclass(frozen=True)
class Manifest:
    version: str
    created_at: float
    parent: str | None
    base_model: str
    settings: dict[str, Any] = field(default_factory=dict)
    data: DataUsed = field(default_factory=DataUsed)
    metrics: Metrics = field(default_factory=Metrics)
    decision: Verdict | None = None  # None: a candidate, not yet judged
    libraries: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "created_at": self.created_at,
            "parent": self.parent,
            "base_model": self.base_model,
            "settings": self.settings,
            "data": asdict(self.data),
            "metrics": self.metrics.to_dict(),
            "decision": asdict(self.decision) if self.decision else "candidate",
            "libraries": self.libraries,
        }
        if self.files:
            out["files"] = self.files
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        d = _dict(d)
        return cls(
            version=str(d.get("version") or ""),
            created_at=float(d.get("created_at") or 0.0),
            parent=d.get("parent"),
            base_model=str(d.get("base_model") or ""),
            settings=_dict(d.get("settings")),
            data=DataUsed.from_dict(d.get("data")),
            metrics=Metrics.from_dict(d.get("metrics")),
            decision=Verdict.from_dict(d.get("decision")),
            libraries={str(k): str(v) for k, v in _dict(d.get("libraries")).items()},
            files={str(k): str(v) for k, v in _dict(d.get("files")).items()},
        )

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Manifest | None:
        """A manifest stored as JSON text (the store's ``manifest`` column), or None."""
        return cls.from_dict(json.loads(text)) if text else None

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The manifest of a version folder, or None where it has none."""
        path = folder / MANIFEST
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None

    def judged(self, metrics: Metrics, decision: Verdict) -> Manifest:
        return replace(self, metrics=metrics, decision=decision)


# -- names -------------------------------------------------------------------------------------
def staging_dir(adapters: Path, version: str) -> Path:
    """Where a candidate lives while it is evaluated, before its folder is final."""
    return adapters / f".staging.{version}"


def state_dir(folder: Path) -> Path:
    return folder / "state"


def next_name(used: Iterable[str | None], adapters: Path) -> str:
    """The next never-used name, v0001, v0002, ...: past every name in ``used`` (the store's
    versions and cycles) and every folder on disk, staged and half-written ones too."""
    numbers = [0]
    names = list(used) + ([p.name for p in adapters.iterdir()] if adapters.exists() else [])
    for name in names:
        m = _VERSION_IN.search(name or "")
        if m:
            numbers.append(int(m.group(1)))
    return f"v{max(numbers) + 1:04d}"


def lineage(adapters: Path, parent: str | None) -> list[tuple[str, Manifest]]:
    """The ancestors of a version, nearest first, with their manifests (a missing folder ends
    the line)."""
    out: list[tuple[str, Manifest]] = []
    seen: set[str] = set()
    while parent and parent not in seen:
        seen.add(parent)
        manifest = Manifest.read(adapters / parent)
        if manifest is None:
            break
        out.append((parent, manifest))
        parent = manifest.parent
    return out


def clear_half_written(adapters: Path) -> None:
    """Remove what a crash left half-written (one cycle runs at a time)."""
    for stale in adapters.glob(".tmp.*"):
        shutil.rmtree(stale, ignore_errors=True)


# -- files -------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_jsonl(path: Path, rows: Sequence[Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def read_reservoir(state: Path | None) -> tuple[list[Any], int]:
    """A version's replay reservoir and how many examples it has seen."""
    if state is None or not (state / State.RESERVOIR).exists():
        return [], 0
    meta = json.loads((state / State.RESERVOIR_META).read_text())
    with open(state / State.RESERVOIR, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()], int(meta["seen"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)


def write_staged(
    adapters: Path,
    manifest: Manifest,
    adapter_dir: Path,
    work: Path,
    state_files: dict[str, Callable[[Path], object]],
) -> tuple[Path, Manifest]:
    """Assemble the candidate in a temporary folder (the adapter, its EWC state and loss log,
    ``state_files`` written by their functions, the manifest with every file's sha256), fsync
    it and rename it to its staging folder. Returns the folder and the manifest as written."""
    version = manifest.version
    target = staging_dir(adapters, version)
    if target.exists() or (adapters / version).exists():
        raise FileExistsError(f"version {version} already exists; versions are never reused")
    tmp = adapters / f".tmp.{version}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        state = state_dir(tmp)
        state.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copy2(adapter_dir / name, tmp / name)
        if (adapter_dir / State.EWC).exists():
            shutil.copy2(adapter_dir / State.EWC, state / State.EWC)
        if (work / "progress.jsonl").exists():
            shutil.copy2(work / "progress.jsonl", state / State.TRAIN_LOG)
        for name, write in state_files.items():
            write(state / name)
        files = {
            str(p.relative_to(tmp)): sha256_of(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest = replace(manifest, files=files)
        (tmp / MANIFEST).write_text(manifest.to_json())
        _fsync_tree(tmp)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a disk full mid-way leaves nothing behind
        raise
    _fsync_dir(adapters)
    return target, manifest


def finalize(adapters: Path, manifest: Manifest) -> Path:
    """Write the judged manifest into the staged folder and move it to ``adapters/<version>``;
    after this the folder is never edited."""
    staged = staging_dir(adapters, manifest.version)
    tmp = staged / f"{MANIFEST}.tmp"
    tmp.write_text(manifest.to_json())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, staged / MANIFEST)
    _fsync_dir(staged)
    final = adapters / manifest.version
    os.rename(staged, final)
    _fsync_dir(adapters)
    return final


def registration(adapters: Path, manifest: Manifest, final: Path) -> dict[str, Any]:
    """The store's row for a final version folder (`Store.register_version`)."""
    return {
        "name": manifest.version,
        "created_at": manifest.created_at,
        "parent": manifest.parent,
        "path": str(final.relative_to(adapters.parent)),
        "sha256": manifest.files[WEIGHTS],
        "manifest": json.dumps(manifest.to_dict()),
    }
