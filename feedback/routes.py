"""HTTP routes for feedback: `POST /v1/feedback` and `POST /v1/feedback/batch`.

A 201 is sent only after the writer has committed the item (fsynced WAL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import ORJSONResponse

from feedback.schema import parse_batch, parse_item, parse_json
from feedback.store import Feedback, FeedbackInput, Store
from feedback.writer import Writer


def _store_batch(items: Sequence[FeedbackInput]) -> Callable[[Store], list[Feedback]]:
    def run(store: Store) -> list[Feedback]:
        # The writer runs each job in a savepoint: an unknown interaction in
        # item 7 undoes items 0-6 as well.
        return [store.add_feedback(item) for item in items]

    return run


def build_router(
    writer: Writer, *, auth: Callable[..., Any], on_stored: Callable[[int], None]
) -> APIRouter:
    """The feedback routes; ``auth`` is a FastAPI dependency, ``on_stored`` counts items."""
    router = APIRouter(dependencies=[Depends(auth)], tags=["feedback"])

    @router.post("/v1/feedback", status_code=201, response_class=ORJSONResponse)
    async def post_feedback(request: Request) -> ORJSONResponse:
        item = parse_item(parse_json(await request.body()))
        (fb,) = await writer.call(_store_batch([item]))
        on_stored(1)
        return ORJSONResponse({"id": fb.id, "interaction_id": fb.interaction_id}, status_code=201)

    @router.post("/v1/feedback/batch", status_code=201, response_class=ORJSONResponse)
    async def post_feedback_batch(request: Request) -> ORJSONResponse:
        items = parse_batch(parse_json(await request.body()))
        stored = await writer.call(_store_batch(items))
        on_stored(len(stored))
        return ORJSONResponse(
            {"items": [{"id": f.id, "interaction_id": f.interaction_id} for f in stored]},
            status_code=201,
        )

    return router
