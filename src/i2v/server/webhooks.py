"""Webhooks as Replicate sends them: signed (webhook-id, -timestamp, -signature), throttled, retried.

The signature is HMAC-SHA256 over "{id}.{timestamp}.{body}" keyed with the base64 part of a `whsec_` secret,
so `replicate.webhooks.validate` accepts our deliveries. Non-terminal events (start, output, logs) go out at
most every 500 ms per prediction, the latest state winning; the terminal event is stored and retried with
backoff (about a minute in all), across restarts too.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import heapq
import hmac
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx

from ..errors import InputError
from ..images import Pinned
from .config import RETRY_DELAYS
from .states import WebhookEvent
from .store import DeliveryRow, Store, utcnow

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.5  # seconds between non-terminal webhooks of one prediction
TIMEOUT = 10.0

BodyFactory = Callable[[], str | None]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def load_secret(path: Path, configured: str | None = None) -> str:
    """The signing secret: configured, else kept in the data dir (made on first start, owner-only)."""
    if configured:
        return configured
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)
    return secret


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.split("_", 1)[1])
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    """Queues, signs, throttles and delivers webhooks from background threads."""

    def __init__(
        self,
        store: Store,
        secret: str,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        guard: Callable[[str], Pinned] | None = None,
    ) -> None:
        """`guard` checks a receiver URL before each attempt (the SSRF rules image URLs follow) and pins it to
        the checked address; it raises `InputError` to refuse."""
        self.store, self.secret, self.retry_delays, self.guard = store, secret, retry_delays, guard
        self._heap: list[tuple[float, int, str, object]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._last_sent: dict[str, float] = {}
        self._flush_pending: set[str] = set()
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")
        # One prediction's webhooks go out one after another, in order: a receiver never sees a progress
        # update arrive after the terminal one. Different predictions' webhooks go out side by side.
        self._lines: dict[str, collections.deque[DeliveryRow]] = {}
        self._lines_lock = threading.Lock()
        self._client = httpx.Client(
            timeout=TIMEOUT, follow_redirects=False, headers={"user-agent": "i2v-webhooks"}
        )
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)

    def start(self) -> None:
        for row in self.store.pending_deliveries():
            if row.terminal:
                self._push(0.0, "deliver", row)
            else:  # a progress event from before a restart is stale; the terminal one follows
                self.store.update_delivery(row.id, state="failed", last_error="dropped: the server restarted")
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def send(self, prediction_id: str, url: str, event: WebhookEvent, body: str, *, terminal: bool) -> None:
        """Send now (a terminal event, or a start); progress should go through `send_progress`."""
        if not terminal:
            self._last_sent[prediction_id] = time.monotonic()
        self._push(0.0, "deliver", self._record(prediction_id, url, event, body, terminal))

    def send_progress(self, prediction_id: str, url: str, event: WebhookEvent, body: BodyFactory) -> None:
        """At most one progress webhook per MIN_INTERVAL; a throttled one goes later with the latest state."""
        with self._wake:
            if prediction_id in self._flush_pending:
                return
            due = self._last_sent.get(prediction_id, 0.0) + MIN_INTERVAL
            self._flush_pending.add(prediction_id)
        self._push(max(0.0, due - time.monotonic()), "flush", (prediction_id, url, event, body))

    def forget(self, prediction_id: str) -> None:
        self._last_sent.pop(prediction_id, None)

    def _record(self, prediction_id: str, url: str, event: str, body: str, terminal: bool) -> DeliveryRow:
        now = utcnow()
        row = DeliveryRow(
            id="msg_" + secrets.token_hex(12),
            prediction_id=prediction_id,
            url=url,
            event=event,
            terminal=terminal,
            body=body,
            state="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        self.store.add(row)
        return row

    def _push(self, delay: float, kind: str, payload: object) -> None:
        with self._wake:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), kind, payload))
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._wake.wait(timeout=(self._heap[0][0] - time.monotonic()) if self._heap else None)
                if self._stopping:
                    return
                _, _, kind, payload = heapq.heappop(self._heap)
            if kind == "flush":
                self._flush(*payload)  # type: ignore[misc]
            else:
                self._enqueue(payload)  # type: ignore[arg-type]

    def _enqueue(self, row: DeliveryRow) -> None:
        with self._lines_lock:
            line = self._lines.setdefault(row.prediction_id, collections.deque())
            line.append(row)
            if len(line) > 1:
                return  # the thread draining this prediction's line will get to it
        self._pool.submit(self._drain, row.prediction_id)

    def _drain(self, prediction_id: str) -> None:
        while True:
            with self._lines_lock:
                row = self._lines[prediction_id][0]
            try:
                self._attempt(row)
            except Exception:
                log.exception("webhook delivery %s crashed", row.id)
            with self._lines_lock:
                line = self._lines[prediction_id]
                line.popleft()
                if not line:
                    del self._lines[prediction_id]
                    return

    def _flush(self, prediction_id: str, url: str, event: str, body: BodyFactory) -> None:
        with self._wake:
            self._flush_pending.discard(prediction_id)
        text = body()
        if text is not None:  # None: the prediction ended meanwhile and its terminal webhook says it all
            self.send(prediction_id, url, event, text, terminal=False)

    def _attempt(self, row: DeliveryRow) -> None:
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": row.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, row.id, timestamp, row.body),
        }
        row.attempts += 1
        url, extensions = row.url, {}
        try:
            if self.guard is not None:
                pinned = self.guard(row.url)
                url, extensions = pinned.url, {"sni_hostname": pinned.host}
                headers["host"] = pinned.host_header
            response = self._client.post(
                url, content=row.body.encode(), headers=headers, extensions=extensions
            )
            error = None if response.is_success else f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except InputError as exc:  # the receiver's address is refused (it may have changed since create)
            error = exc.rule
        if error is None:
            self.store.update_delivery(row.id, state="delivered", attempts=row.attempts, last_error=None)
            return
        retry = row.terminal and row.attempts <= len(self.retry_delays)
        log.warning(
            "webhook %s for %s to %s failed (%s)%s",
            row.event,
            row.prediction_id,
            row.url,
            error,
            "; retrying" if retry else "",
        )
        if retry:
            delay = self.retry_delays[row.attempts - 1]
            self.store.update_delivery(
                row.id,
                attempts=row.attempts,
                last_error=error,
                next_attempt_at=utcnow() + timedelta(seconds=delay),
            )
            self._push(delay, "deliver", row)
        else:
            if row.terminal:
                log.error(
                    "webhook %s for %s to %s: giving up after %d attempts", row.event, row.prediction_id,
                    row.url, row.attempts,
                )  # fmt: skip
            self.store.update_delivery(row.id, state="failed", attempts=row.attempts, last_error=error)
