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
    status = 503
    type = "server_error"
    code = "store_busy"
