"""Errors raised by the feedback package.

Each carries the HTTP status, OpenAI error ``type`` and ``code`` it maps to; the
daemon's HTTP layer is the one place that turns them into responses.
"""

from __future__ import annotations


class FeedbackError(Exception):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidFeedback(FeedbackError):
    status = 422
    code = "invalid_feedback"


class UnknownInteraction(FeedbackError):
    status = 404
    code = "unknown_interaction"

    def __init__(self, interaction_id: str) -> None:
        super().__init__(
            f"no interaction with id {interaction_id!r}: use the id returned in the response's "
            "`id` field or `x-adaptd-interaction-id` header, or send `messages` and `response`"
        )
        self.interaction_id = interaction_id


class StoreError(FeedbackError):
    status = 500
    type = "server_error"
    code = "store_error"


class StoreBusy(FeedbackError):
    """The write could not be taken now (queue full, or the database locked by another
    program past the busy timeout): nothing was stored; retry."""

    status = 503
    type = "server_error"
    code = "store_busy"
    headers = {"Retry-After": "1"}


class StoreFull(StoreError):
    """The database could not be written: the disk is full (or a quota or file-size limit was
    reached, or the write itself failed). Nothing was stored; retry once there is room.

    507 Insufficient Storage says exactly this; OpenAI's SDKs retry it like any 5xx."""

    status = 507
    code = "insufficient_storage"
    headers = {"Retry-After": "10"}
