"""JSONL export and import (`feedback.jsonl`) between real SQLite files."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from feedback.errors import InvalidFeedback
from feedback.jsonl import export_jsonl, export_lines, import_jsonl
from feedback.store import FeedbackInput, Interaction, Store

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
]


@pytest.fixture()
def open_store(tmp_path: Path) -> Iterator[Callable[[str], Store]]:
    opened: list[Store] = []

    def make(name: str) -> Store:
        s = Store(tmp_path / name / "adaptd.db")
        s.migrate()
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def fill(store: Store) -> None:
    """Feedback on a chat, on a completion, and on a conversation served elsewhere."""
    with store.db.atomic():
        store.insert_interactions(
            [
                Interaction(
                    id="chatcmpl-1", created_at=10.0, endpoint="chat", model="adaptd",
                    version="base", caller="anonymous", request=CHAT,
                    params={"temperature": 0.7}, output="Lyon.",
                ),
                Interaction(
                    id="cmpl-2", created_at=11.0, endpoint="completion", model="base",
                    version="base", caller="anonymous", request="Once upon a time",
                    params={}, output=" there was a fox.",
                ),
            ]
        )  # fmt: skip
        store.add_feedback(
            FeedbackInput(
                interaction_id="chatcmpl-1", rating=-1, correction="Paris.", comment="wrong city",
                user="ana", tags=["geo"], id="fb-a", created_at=20.0,
            )
        )  # fmt: skip
        store.add_feedback(FeedbackInput(interaction_id="chatcmpl-1", rating=0, id="fb-b",
                                         created_at=21.0))  # fmt: skip
        store.add_feedback(FeedbackInput(interaction_id="cmpl-2", rating=1, tags=["story", "ok"],
                                         id="fb-c", created_at=22.0))  # fmt: skip
        store.add_feedback(
            FeedbackInput(
                messages=[{"role": "user", "content": "2+2?"}], response="5", rating=-1,
                correction="4", id="fb-d", created_at=23.0,
            )
        )  # fmt: skip


def export(store: Store) -> str:
    buf = io.StringIO()
    export_jsonl(store, buf)
    return buf.getvalue()


def without_interaction_id(text: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in text.splitlines()]
    for row in rows:
        row.pop("interaction_id")
    return rows


def test_export_format(open_store: Callable[[str], Store]) -> None:
    src = open_store("src")
    fill(src)
    rows = [json.loads(line) for line in export_lines(src)]
    assert [r["id"] for r in rows] == ["fb-a", "fb-b", "fb-c", "fb-d"]
    first = rows[0]
    assert first == {
        "messages": [*CHAT, {"role": "assistant", "content": "Lyon."}],
        "id": "fb-a",
        "interaction_id": "chatcmpl-1",
        "created_at": 20.0,
        "rating": -1,
        "correction": "Paris.",
        "comment": "wrong city",
        "user": "ana",
        "tags": ["geo"],
    }
    assert rows[2]["messages"] == [
        {"role": "user", "content": "Once upon a time"},
        {"role": "assistant", "content": " there was a fox."},
    ]


def test_round_trip_into_a_fresh_database(open_store: Callable[[str], Store]) -> None:
    src, dst = open_store("src"), open_store("dst")
    fill(src)
    text = export(src)
    result = import_jsonl(dst, io.StringIO(text))
    assert (result.added, result.skipped) == (4, 0)

    def summary(store: Store) -> list[tuple[Any, ...]]:
        return [
            (f.id, f.created_at, f.rating, f.correction, f.comment, f.user, f.tags,
             i.messages(), i.output)
            for f, i in store.iter_feedback_with_interactions()
        ]  # fmt: skip

    assert summary(dst) == summary(src)
    # And exporting the copy gives the same file, but for interaction ids that were not
    # present in the fresh database (they became external interactions).
    assert without_interaction_id(export(dst)) == without_interaction_id(text)
    assert {i.endpoint for i in dst.interactions()} == {"external"}


def test_reimport_skips_everything(open_store: Callable[[str], Store]) -> None:
    src, dst = open_store("src"), open_store("dst")
    fill(src)
    text = export(src)
    assert import_jsonl(dst, io.StringIO(text)).added == 4
    counts = dst.feedback_counts()
    again = import_jsonl(dst, io.StringIO(text))
    assert (again.added, again.skipped) == (0, 4)
    assert dst.feedback_counts() == counts
    # Into the source itself: everything is already there.
    assert import_jsonl(src, io.StringIO(text)).added == 0


def test_blank_lines_are_ignored(open_store: Callable[[str], Store]) -> None:
    src, dst = open_store("src"), open_store("dst")
    fill(src)
    lines = export(src).splitlines()
    text = "\n\n".join(lines) + "\n\n   \n"
    assert import_jsonl(dst, io.StringIO(text)).added == 4


@pytest.mark.parametrize(
    "bad_line",
    [
        "{not json",
        '["a", "list"]',
        '{"id": "fb-x", "messages": [{"role": "user", "content": "hi"}], "rating": 1}',
        '{"id": "fb-x", "messages": [{"role": "user", "content": "q"}, '
        '{"role": "assistant", "content": "a"}], "rating": 7}',
        '{"id": "fb-x", "messages": [{"role": "user", "content": "q"}, '
        '{"role": "assistant", "content": "a"}], "rating": 1, "score": 3}',
    ],
    ids=["not json", "not an object", "no answer", "bad rating", "unknown field"],
)
def test_a_bad_line_imports_nothing(open_store: Callable[[str], Store], bad_line: str) -> None:
    src, dst = open_store("src"), open_store("dst")
    fill(src)
    lines = export(src).splitlines()
    text = "\n".join([lines[0], lines[1], bad_line, lines[3]]) + "\n"
    with pytest.raises(InvalidFeedback, match="line 3"):
        import_jsonl(dst, io.StringIO(text))
    assert dst.feedback() == []
    assert dst.interactions() == []
    assert not dst.db.conn.in_transaction
    # The database is still usable afterwards.
    assert import_jsonl(dst, io.StringIO("\n".join(lines))).added == 4


def test_unknown_interaction_with_messages_becomes_external(
    open_store: Callable[[str], Store],
) -> None:
    dst = open_store("dst")
    line = json.dumps(
        {
            "messages": [*CHAT, {"role": "assistant", "content": "Lyon."}],
            "id": "fb-z",
            "interaction_id": "chatcmpl-from-elsewhere",
            "rating": -1,
            "correction": "Paris.",
        }
    )
    assert import_jsonl(dst, [line]).added == 1
    (fb,) = dst.feedback()
    assert fb.id == "fb-z" and fb.interaction_id != "chatcmpl-from-elsewhere"
    inter = dst.get_interaction(fb.interaction_id)
    assert inter is not None
    assert inter.endpoint == "external"
    assert inter.messages() == CHAT
    assert inter.output == "Lyon."


def test_known_interaction_id_is_kept(open_store: Callable[[str], Store]) -> None:
    dst = open_store("dst")
    fill(dst)
    line = json.dumps({"interaction_id": "cmpl-2", "comment": "again", "id": "fb-new"})
    assert import_jsonl(dst, [line]).added == 1
    assert [f.interaction_id for f in dst.feedback() if f.id == "fb-new"] == ["cmpl-2"]
    assert len(dst.interactions()) == 3  # no new external interaction
