"""A running cycle's stage and progress, as `/admin/status` and `adaptd status` show them."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.cli import _running_cycle
from daemon.cycle import cycle_progress
from feedback.store import Cycle


def cycle(state: str, version: str | None = "v0004") -> Cycle:
    return Cycle(id="c-1", created_at=1000.0, state=state, version=version)


def log(data: Path, lines: list[dict[str, float]], tail: str = "") -> None:
    work = data / "work" / "v0004"
    work.mkdir(parents=True)
    text = "".join(json.dumps(x) + "\n" for x in lines) + tail
    (work / "progress.jsonl").write_text(text)


def test_training_progress_is_the_last_whole_line_against_the_budget(tmp_path: Path) -> None:
    # resumed at step 8 (a restart): 12 steps of this loop in 144 s, after 100 s of loading
    rows = [
        {"step": k, "total": 50, "elapsed_s": 100.0 + 12.0 * (k - 8), "loop_from": 8,
         "loop_s": 12.0 * (k - 8)}
        for k in range(9, 21)
    ]  # fmt: skip
    log(tmp_path, rows, tail='{"step": 21, "tot')  # a line still being written
    p = cycle_progress(cycle("training"), tmp_path, now=1420.0)
    assert p["state"] == "training" and p["running_s"] == 420.0
    # 12 s a step: the other 30 of the budget would take 360 s at that pace
    assert p["training"] == {"step": 20, "of": 50, "elapsed_s": 244.0, "left_at_most_s": 360.0}
    line = _running_cycle(p, "c-1")
    assert line.startswith("c-1 (v0004): training, 7 min in; step 20 of 50, at most 6 min left")


def test_other_stages_and_missing_or_old_logs_give_the_stage_alone(tmp_path: Path) -> None:
    assert cycle_progress(cycle("curating", None), tmp_path, 1030.0)["training"] is None
    assert cycle_progress(cycle("training"), tmp_path, 1030.0)["training"] is None  # no log yet
    log(tmp_path, [{"step": 3, "elapsed_s": 1.0}])  # a log from before "total" and the pace
    p = cycle_progress(cycle("training"), tmp_path, 1030.0)
    assert p["training"] is None
    assert _running_cycle(p, "c-1") == "c-1 (v0004): training, 30 s in"
    assert cycle_progress(cycle("evaluating"), tmp_path, 1030.0)["training"] is None
    assert _running_cycle(None, None) == "none"
