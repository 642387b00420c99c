"""Webhooks as Replicate sends them: signed (webhook-id, -timestamp, -signature), throttled, retried.

The signature is HMAC-SHA256 over "{id}.{timestamp}.{body}" keyed with the base64 part of a `whsec_` secret,
so `replicate.webhooks.validate` accepts our deliveries. Non-terminal events (start, output, logs) go out at
most every 500 ms per prediction, the latest state winning; the terminal event is stored and retried with
backoff (about a minute in all), across restarts too.

Each token has its own secret, as each Replicate account has (`WebhookSecrets`): one token cannot sign what
another token's receiver accepts. An operator-set `I2V_WEBHOOK_SECRET` applies to every token, as before.

With several servers on one database each delivery is claimed by the server that records it and sent only
by that one (checked before each attempt); the pending deliveries of a server that is gone are adopted by
another (`adopt`), so each webhook goes out once.
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
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx

from ..errors import InputError
from ..images import Pinned, refuse_odd_redirects
from .config import RETRY_DELAYS
from .states import WebhookEvent
from .store import DeliveryRow, Store, utcnow

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.5  # seconds between non-terminal webhooks of one prediction
TIMEOUT = 10.0

BodyFactory = Callable[[], str | None]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def read_or_make_secret(path: Path, make: Callable[[], str]) -> str:
    """A secret kept in the data dir: read, or made on first start (owner-only)."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    return value


class WebhookSecrets:
    """The signing secret of each token (by owner id).

    - `I2V_WEBHOOK_SECRET` set: that one secret for every token (the operator chose one, as before).
    - a data dir from before per-token secrets (its `webhook_secret` file): that secret for every token, so
      receivers set up with it keep working; deleting the file gives each token its own.
    - otherwise each token's secret is derived from a key kept in the data dir (`webhook_key`, made on
      first start): `whsec_` + base64(HMAC-SHA256(key, owner id)); stable across restarts, never stored.
      With several servers on one database (`store.shared`) the key is kept in the database instead, so
      every server signs a token's webhooks alike (seeded from the data dir's key when it has one).
    """

    def __init__(self, data_dir: Path, configured: str | None = None, store: Store | None = None) -> None:
        legacy = data_dir / "webhook_secret"
        self.shared = configured or (legacy.read_text().strip() if legacy.is_file() else None)
        self.shared_reason = (
            "I2V_WEBHOOK_SECRET" if configured else f"{legacy} (delete it to give each token its own)"
        )
        self._key = None
        if self.shared is None:
            kept = data_dir / "webhook_key"
            if store is not None and store.shared:
                key = store.shared_value(
                    "webhook_key",
                    lambda: kept.read_text().strip() if kept.is_file() else secrets.token_hex(32),
                )
            else:
                key = read_or_make_secret(kept, lambda: secrets.token_hex(32))
            self._key = bytes.fromhex(key)

    def for_owner(self, owner: str) -> str:
        if self.shared is not None:
            return self.shared
        assert self._key is not None
        digest = hmac.new(self._key, f"i2v webhook secret for {owner}".encode(), hashlib.sha256).digest()
        return "whsec_" + base64.b64encode(digest).decode()


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.split("_", 1)[1])
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    """Queues, signs, throttles and delivers webhooks from background threads."""

    def __init__(
        self,
        store: Store,
        secrets: WebhookSecrets,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        guard: Callable[[str], Pinned] | None = None,
    ) -> None:
        """`guard` checks a receiver URL before each attempt (the SSRF rules image URLs follow) and pins it to
        the checked address; it raises `InputError` to refuse."""
        self.store, self.secrets, self.retry_delays, self.guard = store, secrets, retry_delays, guard
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
            timeout=TIMEOUT,
            follow_redirects=False,
            headers={"user-agent": "i2v-webhooks"},
            event_hooks={"response": [refuse_odd_redirects]},
        )
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)

    def start(self, claimants: Collection[int | None] | None = None) -> None:
        """Adopt what a stopped server left pending (`adopt`), then start sending."""
        self.adopt(claimants)
        self._thread.start()

    def adopt(self, claimants: Collection[int | None] | None = None) -> int:
        """Take over the pending deliveries of servers that are gone (by default every other: SQLite's
        restart); returns how many. Terminal ones are sent again; a progress event is stale by now (the
        terminal one follows)."""
        rows = self.store.adopt_deliveries(claimants)
        for row in rows:
            if row.terminal:
                self._push(0.0, "deliver", row)
            else:
                self.store.update_delivery(row.id, state="failed", last_error="dropped: the server restarted")
        return len(rows)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def send(
        self, prediction_id: str, owner: str, url: str, event: WebhookEvent, body: str, *, terminal: bool
    ) -> None:
        """Send now (a terminal event, or a start); progress should go through `send_progress`.

        Returns at once: the delivery is recorded (retried until the database takes it) and sent on the
        sender's own threads, so a caller (a cancel) never waits on the database or the receiver."""
        if not terminal:
            self._last_sent[prediction_id] = time.monotonic()
        now = utcnow()
        row = DeliveryRow(
            id="msg_" + secrets.token_hex(12),
            prediction_id=prediction_id,
            owner=owner,
            url=url,
            event=event,
            terminal=terminal,
            body=body,
            state="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            claimed_by=self.store.claimant,
        )
        self._push(0.0, "record", row)

    def send_progress(
        self, prediction_id: str, owner: str, url: str, event: WebhookEvent, body: BodyFactory
    ) -> None:
        """At most one progress webhook per MIN_INTERVAL; a throttled one goes later with the latest state."""
        with self._wake:
            if prediction_id in self._flush_pending:
                return
            due = self._last_sent.get(prediction_id, 0.0) + MIN_INTERVAL
            self._flush_pending.add(prediction_id)
        self._push(max(0.0, due - time.monotonic()), "flush", (prediction_id, owner, url, event, body))

    def forget(self, prediction_id: str) -> None:
        self._last_sent.pop(prediction_id, None)

    def _record(self, row: DeliveryRow) -> None:
        what = f"the {row.event} webhook of {row.prediction_id}"
        self.store.until_written(what, lambda: self.store.add(row))
        self._enqueue(row)

    def _update(self, row: DeliveryRow, **changes: object) -> None:
        what = f"the {row.event} webhook of {row.prediction_id}"
        self.store.until_written(what, lambda: self.store.update_delivery(row.id, **changes))

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
            try:
                if kind == "flush":
                    self._flush(*payload)  # type: ignore[misc]
                elif kind == "record":
                    self._record(payload)  # type: ignore[arg-type]
                else:
                    self._enqueue(payload)  # type: ignore[arg-type]
            except Exception:  # the store closed under a retry, or a bug: the loop goes on
                log.exception("webhook %s failed", kind)

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

    def _flush(
        self, prediction_id: str, owner: str, url: str, event: WebhookEvent, body: BodyFactory
    ) -> None:
        with self._wake:
            self._flush_pending.discard(prediction_id)
        text = body()
        if text is not None:  # None: the prediction ended meanwhile and its terminal webhook says it all
            self.send(prediction_id, owner, url, event, text, terminal=False)

    def _attempt(self, row: DeliveryRow) -> None:
        if not self.store.until_written(
            f"the claim of webhook {row.id}", lambda: self.store.holds_delivery(row.id)
        ):
            log.warning("webhook %s for %s: another server has taken it over", row.id, row.prediction_id)
            return
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": row.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secrets.for_owner(row.owner), row.id, timestamp, row.body),
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
            if response.is_redirect:  # webhooks are not redirected (Replicate's are not either)
                where = response.headers.get("location", "")[:200]
                error = f"HTTP {response.status_code}: the receiver redirected to {where}; webhooks do not follow redirects"
            else:
                error = None if response.is_success else f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except InputError as exc:  # the receiver's address is refused (it may have changed since create)
            error = exc.rule
        except Exception as exc:  # whatever else: an attempt that failed, counted, never pending forever
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            self._update(row, state="delivered", attempts=row.attempts, last_error=None)
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
            self._update(
                row,
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
            self._update(row, state="failed", attempts=row.attempts, last_error=error)
