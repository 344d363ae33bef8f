"""HTTP routes for feedback: `POST /v1/feedback` and `POST /v1/feedback/batch`.

A 201 is sent only after the writer has committed the item (fsynced WAL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, get_args

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from feedback.schema import (
    MAX_BATCH,
    MAX_MESSAGES,
    MAX_TAGS,
    MAX_TEXT,
    ChatMessage,
    parse_batch,
    parse_item,
    parse_json,
)
from feedback.store import Feedback, FeedbackInput, Store
from feedback.writer import Writer


def _openapi_item() -> dict[str, Any]:
    """A feedback item for the OpenAPI document (the routes read the raw body and check it
    with `feedback.schema`, which also refuses `interaction_id` together with `messages` or
    `response`)."""
    text = {"type": "string", "maxLength": MAX_TEXT}
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {
                "type": "string",
                "enum": list(get_args(ChatMessage.model_fields["role"].annotation)),
            },
            "content": {
                "anyOf": [text, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]
            },
        },
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "interaction_id": {"type": "string", "minLength": 1, "maxLength": 128},
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_MESSAGES,
                "items": message,
            },
            "response": text,
            "rating": {"type": "integer", "minimum": -1, "maximum": 1},
            "correction": text,
            "comment": text,
            "user": {"type": "string", "maxLength": 256},
            "tags": {
                "type": "array",
                "maxItems": MAX_TAGS,
                "items": {"type": "string", "minLength": 1, "maxLength": 64},
            },
        },
        "oneOf": [{"required": ["interaction_id"]}, {"required": ["messages", "response"]}],
        "anyOf": [
            {"required": ["rating"]},
            {"required": ["correction"]},
            {"required": ["comment"]},
        ],
    }


def _openapi(body: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}


_STORED = {
    "type": "object",
    "required": ["id", "interaction_id"],
    "properties": {"id": {"type": "string"}, "interaction_id": {"type": "string"}},
}
_BATCH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["items"],
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": _openapi_item()}
    },
}


def _created(schema: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    return {201: {"content": {"application/json": {"schema": schema}}}}


def _store_batch(items: Sequence[FeedbackInput]) -> Callable[[Store], list[Feedback]]:
    def run(store: Store) -> list[Feedback]:
        # The writer runs each job in a savepoint: an unknown interaction in
        # item 7 undoes items 0-6 as well.
        return [store.add_feedback(item) for item in items]

    return run


def _created_json(body: dict[str, Any]) -> Response:
    """201 with an orjson-encoded body (FastAPI's ORJSONResponse is deprecated)."""
    return Response(orjson.dumps(body), status_code=201, media_type="application/json")


def build_router(
    writer: Writer, *, auth: Callable[..., Any], on_stored: Callable[[int], None]
) -> APIRouter:
    """The feedback routes; ``auth`` is a FastAPI dependency, ``on_stored`` counts items."""
    router = APIRouter(dependencies=[Depends(auth)], tags=["feedback"])

    @router.post(
        "/v1/feedback",
        status_code=201,
        openapi_extra=_openapi(_openapi_item()),
        responses=_created(_STORED),
    )
    async def post_feedback(request: Request) -> Response:
        item = parse_item(parse_json(await request.body()))
        (fb,) = await writer.call(_store_batch([item]))
        on_stored(1)
        return _created_json({"id": fb.id, "interaction_id": fb.interaction_id})

    @router.post(
        "/v1/feedback/batch",
        status_code=201,
        openapi_extra=_openapi(_BATCH),
        responses=_created(
            {
                "type": "object",
                "required": ["items"],
                "properties": {"items": {"type": "array", "items": _STORED}},
            }
        ),
    )
    async def post_feedback_batch(request: Request) -> Response:
        items = parse_batch(parse_json(await request.body()))
        stored = await writer.call(_store_batch(items))
        on_stored(len(stored))
        return _created_json(
            {"items": [{"id": f.id, "interaction_id": f.interaction_id} for f in stored]}
        )

    return router
