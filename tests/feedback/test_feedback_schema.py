"""Table-driven cases for `feedback.schema`: what a feedback item may and may not look like."""

from __future__ import annotations

from typing import Any

import pytest

from feedback.errors import InvalidFeedback
from feedback.schema import MAX_BATCH, MAX_TAGS, MAX_TEXT, parse_batch, parse_item, parse_json
from feedback.store import FeedbackInput

IID = "chatcmpl-123"
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def with_target(**fields: Any) -> dict[str, Any]:
    return {"interaction_id": IID, **fields}


VALID: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("rating only", with_target(rating=-1), {"interaction_id": IID, "rating": -1}),
    ("rating zero", with_target(rating=0), {"rating": 0}),
    ("rating one", with_target(rating=1), {"rating": 1}),
    ("correction only", with_target(correction="Paris."), {"correction": "Paris.", "rating": None}),
    ("comment only", with_target(comment="too long"), {"comment": "too long", "rating": None}),
    (
        "external conversation",
        {"messages": CONVO, "response": "5", "rating": -1, "correction": "4"},
        {"interaction_id": None, "messages": CONVO, "response": "5", "correction": "4"},
    ),
    (
        "tags and user",
        with_target(rating=1, tags=["geo", "short"], user="ana"),
        {"tags": ["geo", "short"], "user": "ana"},
    ),
    ("max tags", with_target(rating=1, tags=[f"t{i}" for i in range(MAX_TAGS)]), {}),
    ("text at the limit", with_target(correction="x" * MAX_TEXT), {"correction": "x" * MAX_TEXT}),
    (
        "message content as parts",
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "response": "hello",
            "comment": "ok",
        },
        {"response": "hello"},
    ),
]


@pytest.mark.parametrize(("obj", "expected"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_items(obj: dict[str, Any], expected: dict[str, Any]) -> None:
    item = parse_item(obj)
    assert isinstance(item, FeedbackInput)
    for key, value in expected.items():
        assert getattr(item, key) == value, key
    assert item.id is None and item.created_at is None


INVALID: list[tuple[str, Any, str]] = [
    ('rating "1"', with_target(rating="1"), "rating"),
    ("rating 2", with_target(rating=2), "rating"),
    ("rating -2", with_target(rating=-2), "rating"),
    ("rating true", with_target(rating=True), "rating"),
    ("rating 0.5", with_target(rating=0.5), "rating"),
    ("no target", {"rating": 1}, "interaction_id"),
    ("messages without response", {"messages": CONVO, "rating": 1}, "response"),
    (
        "both interaction_id and messages",
        with_target(messages=CONVO, response="5", rating=1),
        "interaction_id",
    ),
    ("nothing to say", with_target(tags=["x"]), "rating"),
    ("unknown field", with_target(rating=1, stars=5), "stars"),
    ("tags not a list", with_target(rating=1, tags="geo"), "tags"),
    ("tag empty", with_target(rating=1, tags=["ok", ""]), "tags.1"),
    ("tag not a string", with_target(rating=1, tags=[3]), "tags.0"),
    ("too many tags", with_target(rating=1, tags=[f"t{i}" for i in range(MAX_TAGS + 1)]), "tags"),
    ("correction over the limit", with_target(correction="x" * (MAX_TEXT + 1)), "correction"),
    ("comment over the limit", with_target(comment="x" * (MAX_TEXT + 1)), "comment"),
    (
        "messages with a bad role",
        {"messages": [{"role": "wizard", "content": "hi"}], "response": "r", "rating": 1},
        "messages.0.role",
    ),
    ("messages empty", {"messages": [], "response": "r", "rating": 1}, "messages"),
    ("interaction_id empty", {"interaction_id": "", "rating": 1}, "interaction_id"),
    ("interaction_id not a string", {"interaction_id": 7, "rating": 1}, "interaction_id"),
    ("id from an untrusted caller", with_target(rating=1, id="fb-1"), "id"),
    ("created_at from an untrusted caller", with_target(rating=1, created_at=1.0), "created_at"),
    ("not an object", [with_target(rating=1)], "body"),
]


@pytest.mark.parametrize(("obj", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_items(obj: Any, field: str) -> None:
    with pytest.raises(InvalidFeedback) as err:
        parse_item(obj)
    assert field in str(err.value)
    assert err.value.status == 422


def test_trusted_callers_may_set_id_and_created_at() -> None:
    item = parse_item(with_target(rating=1, id="fb-1", created_at=12.5), trusted=True)
    assert (item.id, item.created_at) == ("fb-1", 12.5)


# --------------------------------------------------------------------------- batches


def test_valid_batch() -> None:
    items = parse_batch({"items": [with_target(rating=1), {"messages": CONVO, "response": "5",
                                                             "comment": "wrong"}]})  # fmt: skip
    assert [i.rating for i in items] == [1, None]
    assert items[1].messages == CONVO


def test_batch_of_the_maximum_size() -> None:
    assert len(parse_batch({"items": [with_target(rating=1)] * MAX_BATCH})) == MAX_BATCH


INVALID_BATCHES: list[tuple[str, Any, list[str]]] = [
    ("not an object", [with_target(rating=1)], ["items"]),
    ("items not a list", {"items": with_target(rating=1)}, ["items"]),
    ("extra key", {"items": [with_target(rating=1)], "extra": 1}, ["items"]),
    ("empty items", {"items": []}, ["items"]),
    ("1001 items", {"items": [with_target(rating=1)] * (MAX_BATCH + 1)}, ["items", "1000"]),
    ("second item invalid", {"items": [with_target(rating=1), with_target(rating=5)]},
     ["items[1]", "rating"]),
    ("second item not an object", {"items": [with_target(rating=1), "x"]}, ["items[1]"]),
    ("id in a batch item", {"items": [with_target(rating=1), with_target(rating=1, id="x")]},
     ["items[1]", "id"]),
    ("nothing to say in a batch item", {"items": [with_target(rating=1), with_target()]},
     ["items[1]", "rating"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("obj", "fragments"), [c[1:] for c in INVALID_BATCHES], ids=[c[0] for c in INVALID_BATCHES]
)
def test_invalid_batches(obj: Any, fragments: list[str]) -> None:
    with pytest.raises(InvalidFeedback) as err:
        parse_batch(obj)
    for fragment in fragments:
        assert fragment in str(err.value)


# --------------------------------------------------------------------------- JSON


def test_parse_json() -> None:
    assert parse_json(b'{"interaction_id": "x", "rating": -1}') == {
        "interaction_id": "x",
        "rating": -1,
    }


@pytest.mark.parametrize("body", [b"", b"{", b"{'a': 1}", b"\xff\xfe", b'{"a": 1} trailing'])
def test_parse_json_rejects_what_is_not_json(body: bytes) -> None:
    with pytest.raises(InvalidFeedback, match="JSON"):
        parse_json(body)
