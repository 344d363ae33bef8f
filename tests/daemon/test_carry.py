"""Every correction is trained on eventually: what the promoted version's cycle held out, the
next cycle trains on (`daemon.candidate.carried_holdout`)."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.candidate import carried_holdout


def row(iid: str, answer: str = "The ferry leaves at 6:40.") -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "When does the ferry leave?"},
                         {"role": "assistant", "content": answer}],
            "interaction_id": iid, "feedback_id": f"f-{iid}", "kind": "correction",
            "served": "At noon."}  # fmt: skip


def test_the_parents_holdout_is_carried_into_training(tmp_path: Path) -> None:
    state = tmp_path / "v0001" / "state"
    state.mkdir(parents=True)
    bad = {"messages": [{"role": "user", "content": "no answer"}], "interaction_id": "x"}
    lines = [json.dumps(r) for r in (row("a"), row("b"), bad, row("c"))]
    (state / "holdout.jsonl").write_text("\n".join(lines) + "\n\n")
    got = carried_holdout(state, exclude={"b"})  # b has new feedback in this cycle's snapshot
    assert [r["interaction_id"] for r in got] == ["a", "c"]
    assert all(r["carried"] is True for r in got)
    assert got[0]["messages"][-1]["content"] == "The ferry leaves at 6:40."
    assert got[0]["served"] == "At noon."


def test_nothing_to_carry_in_the_first_cycle(tmp_path: Path) -> None:
    assert carried_holdout(None, set()) == []
    assert carried_holdout(tmp_path, set()) == []
