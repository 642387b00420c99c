"""A prediction's statuses and the webhook events, as Replicate names them: each list defined once here.

The order is Cog's (its OpenAPI `Status` and `WebhookEvent` enums), which the served schema repeats.
"""

from __future__ import annotations

from typing import Literal, get_args

Status = Literal["starting", "processing", "succeeded", "canceled", "failed"]
STATUSES: tuple[Status, ...] = get_args(Status)
QUEUED: Status = "starting"  # Replicate's name for a prediction that has not begun running
RUNNING: Status = "processing"
SUCCEEDED: Status = "succeeded"
FAILED: Status = "failed"
CANCELED: Status = "canceled"
TERMINAL: frozenset[Status] = frozenset({SUCCEEDED, FAILED, CANCELED})
UNFINISHED: frozenset[Status] = frozenset({QUEUED, RUNNING})

WebhookEvent = Literal["start", "output", "logs", "completed"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)
