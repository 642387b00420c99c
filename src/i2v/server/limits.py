"""Per-token limits: token buckets for request rates, and the identity a token is known by in the store."""

from __future__ import annotations

import hashlib
import math
import threading
import time


def token_owner(token: str | None) -> str:
    """The id stored on a token's predictions and files: a hash, so the database never holds a token."""
    if not token:
        return ""  # no authentication: everything belongs to the one anonymous owner
    return hashlib.sha256(token.encode()).hexdigest()[:24]


class RateLimiter:
    """`per_minute` requests per key, refilled continuously; a full minute's worth may come at once.

    `acquire` returns 0 when the request may go ahead, else the whole seconds until it could (Retry-After).
    A limit of 0 lets everything through.
    """

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> int:
        if self.capacity <= 0:
            return 0
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - when) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.rate))
