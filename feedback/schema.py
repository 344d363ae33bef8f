"""The shape of a feedback item, validated once, for the HTTP routes and for imports."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from feedback.errors import InvalidFeedback
from feedback.store import FeedbackInput

MAX_TEXT = 32_000
MAX_MESSAGES = 256
MAX_TAGS = 32
MAX_BATCH = 1000

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[dict[str, Any]] | None = None


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    interaction_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = (
        None
    )
    response: Text | None = None
    # strict int: a JSON true/false or 1.0 is not a rating.
    rating: Annotated[int, Field(strict=True, ge=-1, le=1)] | None = None
    correction: Text | None = None
    comment: Text | None = None
    user: Annotated[str, StringConstraints(max_length=256)] | None = None
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = Field(default_factory=list)
    # Only accepted from imports (see `parse_item(..., trusted=True)`).
    id: str | None = None
    created_at: float | None = None

    @model_validator(mode="after")
    def _check(self) -> FeedbackBody:
        if self.interaction_id is None and (self.messages is None or self.response is None):
            raise ValueError(
                "give `interaction_id`, or `messages` and `response` for a conversation "
                "served elsewhere"
            )
        if self.interaction_id is not None and (self.messages or self.response):
            raise ValueError("give either `interaction_id` or `messages` + `response`, not both")
        if self.rating is None and self.correction is None and self.comment is None:
            raise ValueError("give at least one of `rating`, `correction` or `comment`")
        return self

    def to_input(self) -> FeedbackInput:
        return FeedbackInput(
            interaction_id=self.interaction_id,
            messages=[m.model_dump(exclude_none=True) for m in self.messages]
            if self.messages
            else None,
            response=self.response,
            rating=self.rating,
            correction=self.correction,
            comment=self.comment,
            user=self.user,
            tags=list(self.tags),
            id=self.id,
            created_at=self.created_at,
        )


def _describe(e: ValidationError, where: str = "") -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}{loc}: {msg}" if loc else f"{where}{msg}".rstrip(": "))
    return "; ".join(parts)


def parse_item(obj: Any, *, where: str = "", trusted: bool = False) -> FeedbackInput:
    if not isinstance(obj, dict):
        raise InvalidFeedback(f"{where or 'body'}: expected a JSON object")
    if not trusted and ("id" in obj or "created_at" in obj):
        raise InvalidFeedback(f"{where}`id` and `created_at` are set by the server")
    try:
        return FeedbackBody.model_validate(obj).to_input()
    except ValidationError as e:
        raise InvalidFeedback(_describe(e, where)) from None


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidFeedback(f"the body is not valid JSON: {e}") from None


def parse_batch(obj: Any) -> list[FeedbackInput]:
    if not isinstance(obj, dict) or set(obj) != {"items"} or not isinstance(obj["items"], list):
        raise InvalidFeedback('expected {"items": [...]}')
    items = obj["items"]
    if not items:
        raise InvalidFeedback("`items` is empty")
    if len(items) > MAX_BATCH:
        raise InvalidFeedback(f"at most {MAX_BATCH} items per batch, got {len(items)}")
    return [parse_item(it, where=f"items[{n}].") for n, it in enumerate(items)]
