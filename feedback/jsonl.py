"""Feedback as JSONL in the Hugging Face chat format, both ways.

Each line is one feedback item::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "<served answer>"}],
     "id": "fb-...", "interaction_id": "chatcmpl-...", "created_at": 1.7e9,
     "rating": -1, "correction": "...", "comment": "...", "user": "...", "tags": [...]}

``messages`` ends with the answer that was served, so the file trains as-is with
`trl`/`datasets`; the feedback fields ride along.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from feedback.errors import InvalidFeedback
from feedback.schema import parse_item
from feedback.store import FeedbackInput, Store


def export_lines(store: Store) -> Iterator[str]:
    for fb, inter in store.iter_feedback_with_interactions():
        messages = [*inter.messages(), {"role": "assistant", "content": inter.output}]
        row = {
            "messages": messages,
            "id": fb.id,
            "interaction_id": fb.interaction_id,
            "created_at": fb.created_at,
            "rating": fb.rating,
            "correction": fb.correction,
            "comment": fb.comment,
            "user": fb.user,
            "tags": fb.tags,
        }
        yield json.dumps(row, ensure_ascii=False)


def export_jsonl(store: Store, out: IO[str]) -> int:
    n = 0
    for line in export_lines(store):
        out.write(line + "\n")
        n += 1
    return n


@dataclass(frozen=True)
class ImportResult:
    added: int
    skipped: int  # already present (same feedback id)


def _to_body(obj: dict[str, Any], store: Store) -> dict[str, Any]:
    body = {k: v for k, v in obj.items() if k not in ("messages", "interaction_id")}
    messages = obj.get("messages")
    iid = obj.get("interaction_id")
    if iid is not None and store.has_interaction(iid):
        body["interaction_id"] = iid
        return body
    if not isinstance(messages, list) or len(messages) < 2:
        raise InvalidFeedback(
            "`messages` must hold the conversation and end with the assistant's answer"
        )
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise InvalidFeedback("the last message must be the assistant's answer")
    body["messages"] = messages[:-1]
    body["response"] = last.get("content")
    return body


def import_jsonl(store: Store, lines: Iterable[str]) -> ImportResult:
    """Import all lines in one transaction, or none of them (the error names the line)."""
    added = skipped = 0
    with store.db.atomic():
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidFeedback(f"line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InvalidFeedback(f"line {n}: expected a JSON object")
            fid = obj.get("id")
            if (
                fid is not None
                and store.db.execute("SELECT 1 FROM feedback WHERE id = ?", [fid]).fetchone()
            ):
                skipped += 1
                continue
            try:
                item: FeedbackInput = parse_item(_to_body(obj, store), trusted=True)
            except InvalidFeedback as e:
                raise InvalidFeedback(f"line {n}: {e}") from None
            store.add_feedback(item)
            added += 1
    return ImportResult(added=added, skipped=skipped)
