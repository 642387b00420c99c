"""The service behind the routes: creates, queues, dispatches and finishes predictions.

Predictions wait in the store (status `starting`) and go to the runner oldest first whenever it has a free
slot. Runner events update the store, wake `Prefer: wait` requests and send webhooks. Nothing here imports
torch: the model runs behind `Runner`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from pydantic import ValidationError

from ..errors import InputError
from ..images import MAX_BYTES as MAX_IMAGE_BYTES
from ..images import ImageLoader, decode_image
from ..request import KlingRequest
from .config import ServerConfig
from .files import Files, new_id
from .limits import RateLimiter
from .runner import Canceled, Event, Failed, Job, Log, Runner, Started, StateChanged, Succeeded
from .schemas import (
    APIError,
    CreatePrediction,
    InvalidField,
    invalid,
    invalid_fields,
    not_found,
    prediction_body,
)
from .store import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, PredictionRow, Store, utcnow
from .webhooks import EVENTS, WebhookSender, load_secret

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("start_image", "end_image")
_OWN_FILE = re.compile(r"^/v1/files/(?P<id>[a-z0-9]+)(?:/download)?/?$")
PREDICT_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900, 1200, 1800, 3600)


class Service:
    def __init__(self, config: ServerConfig, runner: Runner) -> None:
        self.config = config
        self.runner = runner
        config.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.db_path)
        self.files = Files(self.store, config.files_dir, config.retention)
        self.inputs_dir = config.data_dir / "inputs"
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        # Image URLs are fetched here, at create, with the SSRF guard; the worker gets the checked bytes.
        self.loader = ImageLoader(allow_local_paths=False, allow=config.fetch_allow)
        self.webhooks = WebhookSender(
            self.store,
            load_secret(config.data_dir / "webhook_secret", config.webhook_secret),
            retry_delays=config.webhook_retry_delays,
            guard=lambda url: self.loader.pin(url, "webhook"),
        )
        self.request_limit = RateLimiter(config.request_rate)
        self.create_limit = RateLimiter(config.create_rate)
        self._create_lock = threading.Lock()  # the unfinished-per-token count and the insert go together
        self.registry = CollectorRegistry()
        self._predict_time = Histogram(
            "i2v_predict_time_seconds",
            "Time the model spent on a prediction",
            buckets=PREDICT_BUCKETS,
            registry=self.registry,
        )
        self._completed = Counter(
            "i2v_predictions_completed",
            "Predictions that ended, by final status",
            ["status"],
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(self))
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        self._pending = threading.Event()  # set when there may be something to dispatch
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # lifecycle

    def start(self) -> None:
        requeued, failed = self.store.recover_interrupted(self.config.retry_on_restart)
        if requeued or failed:
            log.warning(
                "after restart: %d interrupted prediction(s) queued again, %d failed",
                len(requeued),
                len(failed),
            )
        for prediction_id in failed:
            if row := self.store.prediction(prediction_id):
                self._finished(row)
        self.webhooks.start()
        self.runner.start(self._on_event)
        self._spawn(self._dispatch_loop, "dispatcher")
        if self.config.retention:
            self._spawn(self._retention_loop, "retention")

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        self._pending.set()
        self.runner.stop()
        self.webhooks.stop()
        self.store.close()

    # predictions

    def base_url(self, request_base: str) -> str:
        return self.config.public_url or request_base.rstrip("/")

    def model_known(self, owner: str, name: str) -> bool:
        return f"{owner}/{name}" in self.config.model_names

    def resolve_version(self, version: str, current: str) -> str:
        """The model name for a `version`: a known version id, `owner/name` or `owner/name:id`."""
        name, _, vid = version.partition(":")
        if "/" in name:
            if name in self.config.model_names and vid in ("", current):
                return name
        elif name == current:
            return self.config.model_names[0]
        raise APIError(
            422,
            "Invalid version or not permitted",
            f"version {version!r} does not exist here; use {current} or one of "
            + ", ".join(self.config.model_names),
        )

    def check_rate(self, limiter: RateLimiter, owner: str, what: str) -> None:
        wait = limiter.acquire(owner)
        if wait:
            per_minute = int(limiter.capacity)
            raise APIError(
                429,
                "Too many requests",
                f"this token may make {per_minute} {what} a minute; try again in {wait} s",
                headers={"retry-after": str(wait)},
            )

    def create(
        self, model: str, version: str, body: CreatePrediction, base: str, owner: str = ""
    ) -> PredictionRow:
        try:
            KlingRequest.model_validate(body.input)
        except ValidationError as exc:
            raise invalid("Input validation failed", invalid_fields(exc, "input.")) from None
        webhook = body.webhook or body.webhook_completed
        events = list(body.webhook_events_filter or (EVENTS if body.webhook else ["completed"]))
        if webhook:
            self._check_webhook(webhook)
        self.check_rate(self.create_limit, owner, "predictions")
        self._check_unfinished(owner)  # before fetching images; again, exactly, when the row goes in
        images = self._read_images(body.input, base, owner)
        prediction_id = new_id()
        row = PredictionRow(
            id=prediction_id,
            model=model,
            version=version,
            input=body.input,
            status=QUEUED,
            logs="",
            created_at=utcnow(),
            webhook=webhook,
            webhook_events_filter=events,
            base_url=base,
            attempts=0,
            data_removed=False,
            cancel_requested=False,
            owner=owner,
        )
        saved = [self._input_path(prediction_id, field) for field in images]
        try:
            try:
                for path, data in zip(saved, images.values(), strict=True):
                    path.write_bytes(data)
            except OSError as exc:
                log.error("cannot store the inputs of a new prediction: %s", exc)
                raise APIError(
                    507, "Insufficient storage", f"the server could not store the inputs ({exc.strerror})"
                ) from None
            with self._create_lock:
                self._check_unfinished(owner)
                self.store.add(row)
        except BaseException:
            for path in saved:
                path.unlink(missing_ok=True)
            raise
        self._kick()
        return row

    def _check_unfinished(self, owner: str) -> None:
        limit = self.config.max_unfinished
        if limit and self.store.count_unfinished(owner) >= limit:
            raise APIError(
                429,
                "Too many predictions",
                f"this token already has {limit} predictions waiting or running, the most it may; "
                "wait for some to finish (or cancel them) before creating more",
            )

    def _check_webhook(self, url: str) -> None:
        problem = None
        if urlsplit(url).scheme not in ("http", "https"):
            problem = "must be an http(s) URL"
        else:
            try:
                self.loader.pin(url, "webhook")
            except InputError as exc:
                problem = exc.rule
        if problem:
            raise invalid(
                "Invalid request", [InvalidField(type="format", field="webhook", description=problem)]
            )

    def _read_images(self, inputs: dict[str, Any], base: str, owner: str) -> dict[str, bytes]:
        """Each image input's bytes, fetched and decoded once here so a bad image is a 4xx at create.

        Uploaded files are read from disk (only the caller's own), URLs fetched through the SSRF guard,
        data URIs decoded; then Pillow checks the image as the engine will. Too large: 413; else 422.
        """
        problems, images, too_large = [], {}, False
        for field in IMAGE_FIELDS:
            value = inputs.get(field)
            if not isinstance(value, str):
                continue
            try:
                data = self._image_bytes(value, field, base, owner)
                decode_image(data, field)
            except InputError as exc:
                too_large |= "larger than" in exc.rule
                problems.append(InvalidField(type="image", field=f"input.{field}", description=exc.rule))
            else:
                images[field] = data
        if problems:
            if too_large:
                raise APIError(
                    413,
                    "Payload too large",
                    "\n".join(f"- {p.field}: {p.description}" for p in problems),
                    invalid_fields=problems,
                )
            raise invalid("Input validation failed", problems)
        return images

    def _image_bytes(self, value: str, field: str, base: str, owner: str) -> bytes:
        file_id = self.own_file_id(value, (base,))
        if file_id is None:
            if urlsplit(value).scheme.lower() not in ("http", "https", "data"):
                raise InputError(field, "must be an http(s) URL, a data URI or an uploaded file's URL")
            return self.loader.read_bytes(value, field)
        stored = self.store.file(file_id, owner)
        if stored is None:
            raise InputError(field, f"uploaded file {file_id} does not exist (deleted or expired)")
        if stored.size > MAX_IMAGE_BYTES:
            raise InputError(field, f"image is larger than {MAX_IMAGE_BYTES // 2**20} MB")
        try:
            return self.files.path(file_id).read_bytes()
        except OSError:
            raise InputError(field, f"uploaded file {file_id} does not exist (deleted or expired)") from None

    def _input_path(self, prediction_id: str, field: str) -> Path:
        return self.inputs_dir / f"{prediction_id}.{field}"

    def own_file_id(self, url: str, bases: tuple[str, ...]) -> str | None:
        """The file id when `url` is one of our Files API URLs (we read those from disk, not over HTTP)."""
        for base in {*bases, self.config.public_url}:
            if base and url.startswith(base + "/"):
                match = _OWN_FILE.match(url[len(base) :].split("?", 1)[0])
                if match:
                    return match.group("id")
        return None

    def get(self, prediction_id: str, owner: str | None = None) -> PredictionRow:
        """The prediction; with `owner`, another token's reads as missing (404), as if it did not exist."""
        row = self.store.prediction(prediction_id, owner)
        if row is None:
            raise not_found(f"prediction {prediction_id}")
        return row

    def cancel(self, prediction_id: str, owner: str | None = None) -> PredictionRow:
        row = self.get(prediction_id, owner)
        if row.status == QUEUED:
            done = self.store.transition(prediction_id, {QUEUED}, status=CANCELED, completed_at=utcnow())
            if done is not None:
                self._finished(done)
                return done
            row = self.get(prediction_id)
        if row.status == RUNNING:
            self.store.transition(prediction_id, {RUNNING}, cancel_requested=True)
            self.runner.cancel(prediction_id)  # the worker stops at its next step and reports Canceled
        return self.get(prediction_id)

    async def wait(self, prediction_id: str, timeout: float) -> PredictionRow:
        """The prediction once it has ended, or as it is when `timeout` seconds have passed."""
        loop, done = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            self._waiters.setdefault(prediction_id, []).append((loop, done))
        try:
            row = await asyncio.to_thread(self.get, prediction_id)
            if row.status not in TERMINAL:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout)
                row = await asyncio.to_thread(self.get, prediction_id)
            return row
        finally:
            with self._lock:
                self._waiters[prediction_id].remove((loop, done))
                if not self._waiters[prediction_id]:
                    del self._waiters[prediction_id]

    # dispatch

    def _kick(self) -> None:
        self._pending.set()

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._pending.clear()  # before looking, so a kick during the look is not lost
            try:
                while self.runner.free_slots() > 0 and self._dispatch_one():
                    pass
            except Exception:
                log.exception("dispatch failed")
            self._pending.wait(timeout=1.0)

    def _dispatch_one(self) -> bool:
        queued = self.store.next_queued()
        if queued is None:
            return False
        row = self.store.transition(
            queued.id, {QUEUED}, status=RUNNING, started_at=utcnow(), attempts=queued.attempts + 1
        )
        if row is None:  # canceled meanwhile
            return True
        try:
            request = self._resolve_images(row)
        except ValueError as exc:
            self._finish(row.id, status=FAILED, error=str(exc))
            return True
        self._webhook(row, "start")
        self.runner.submit(
            Job(id=row.id, request=request, output=str(self.config.outputs_dir / f"{row.id}.mp4"))
        )
        if (latest := self.store.prediction(row.id)) and latest.cancel_requested:
            self.runner.cancel(row.id)  # a cancel that came between the queue and the worker
        return True

    def _resolve_images(self, row: PredictionRow) -> dict[str, Any]:
        request = dict(row.input)
        for field in IMAGE_FIELDS:
            value = request.get(field)
            kept = self._input_path(row.id, field)
            if isinstance(value, str) and kept.is_file():  # checked at create: the worker fetches nothing
                request[field] = (
                    "data:application/octet-stream;base64," + base64.b64encode(kept.read_bytes()).decode()
                )
            elif isinstance(value, str) and (file_id := self.own_file_id(value, (row.base_url,))):
                stored = self.store.file(file_id)
                if stored is not None and stored.size > MAX_IMAGE_BYTES:
                    raise ValueError(f"{field}: image is larger than {MAX_IMAGE_BYTES // 2**20} MB")
                data = self.files.data_uri(file_id)
                if data is None:
                    raise ValueError(
                        f"{field}: uploaded file {file_id} no longer exists (deleted or expired)"
                    )
                request[field] = data
        return request

    # runner events (from the runner's threads)

    def _on_event(self, event: Event) -> None:
        try:
            self._handle(event)
        except Exception:
            log.exception("handling %r failed", event)

    def _handle(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            if event.state == "SETUP_FAILED":
                log.error("worker setup failed: %s", event.detail)
            self._kick()
        elif isinstance(event, Started):
            pass  # the dispatcher already marked it processing
        elif isinstance(event, Log):
            row = self.store.append_log(event.id, event.line)
            if row is not None and row.webhook and "logs" in row.webhook_events_filter:
                self.webhooks.send_progress(
                    row.id, row.webhook, "logs", lambda: self._progress_body(event.id)
                )
        elif isinstance(event, Succeeded):
            seed = event.info.get("seed")
            if not (self.config.outputs_dir / f"{event.id}.mp4").is_file():
                self._finish(
                    event.id, status=FAILED, error="the output video is missing from the data folder"
                )
                return
            self._finish(
                event.id,
                status=SUCCEEDED,
                output=f"{event.id}.mp4",
                predict_time=event.predict_time,
                log_line=f"seed: {seed}" if seed is not None else None,
            )
        elif isinstance(event, Failed):
            if event.worker_lost and self._run_again(event.id):
                return
            self._finish(event.id, status=FAILED, error=event.error)
        elif isinstance(event, Canceled):
            self._finish(event.id, status=CANCELED)

    def _run_again(self, prediction_id: str) -> bool:
        """With `retry_on_restart`, a prediction whose worker died goes back to the queue's front, once."""
        row = self.store.prediction(prediction_id)
        if not self.config.retry_on_restart or row is None or row.attempts >= 2 or row.cancel_requested:
            return False
        line = "the worker process died while this prediction ran; running it again\n"
        again = self.store.transition(
            prediction_id, {RUNNING}, status=QUEUED, started_at=None, logs=row.logs + line
        )
        if again is not None:
            log.warning("prediction %s: its worker died; running it again", prediction_id)
            self._kick()
        return again is not None

    def _finish(
        self, prediction_id: str, *, status: str, log_line: str | None = None, **changes: Any
    ) -> None:
        current = self.store.prediction(prediction_id)
        if current is None:
            return
        logs = current.logs + (log_line + "\n" if log_line else "")
        if "predict_time" not in changes and current.started_at is not None:
            changes["predict_time"] = (utcnow() - current.started_at).total_seconds()
        row = self.store.transition(
            prediction_id, {QUEUED, RUNNING}, status=status, completed_at=utcnow(), logs=logs, **changes
        )
        if row is None:  # already ended (a late report after a restart); keep what was decided
            if status == SUCCEEDED:
                (self.config.outputs_dir / f"{prediction_id}.mp4").unlink(missing_ok=True)
            return
        self._finished(row)
        self._kick()

    def _finished(self, row: PredictionRow) -> None:
        for field in IMAGE_FIELDS:
            self._input_path(row.id, field).unlink(missing_ok=True)
        self._completed.labels(row.status).inc()
        if row.predict_time is not None:
            self._predict_time.observe(row.predict_time)
        with self._lock:
            waiters = list(self._waiters.get(row.id, []))
        for loop, done in waiters:
            loop.call_soon_threadsafe(done.set)
        if row.webhook:
            # The single output (the mp4) exists only at the end, so `output` and `completed` coincide: one
            # terminal delivery serves both filters instead of two copies of the same body.
            events = row.webhook_events_filter
            if "completed" in events:
                self._webhook(row, "completed", terminal=True)
            elif "output" in events and row.output:
                self._webhook(row, "output", terminal=True)
        self.webhooks.forget(row.id)

    def _webhook(self, row: PredictionRow, event: str, *, terminal: bool = False) -> None:
        if not row.webhook or event not in row.webhook_events_filter:
            return
        body = _json(prediction_body(row, self.config.public_url or row.base_url))
        self.webhooks.send(row.id, row.webhook, event, body, terminal=terminal)

    def _progress_body(self, prediction_id: str) -> str | None:
        row = self.store.prediction(prediction_id)
        if row is None or row.status in TERMINAL:
            return None
        return _json(prediction_body(row, self.config.public_url or row.base_url))

    # health, metrics, retention

    def health(self) -> dict[str, Any]:
        state = self.runner.state()
        body: dict[str, Any] = {"status": state, "queue_depth": self.store.counts_by_status()[QUEUED]}
        if state == "SETUP_FAILED":
            body["setup"] = {"status": "failed", "logs": self.runner.setup_error()}
        return body

    def _retention_loop(self) -> None:
        period = max(1.0, min(60.0, (self.config.retention or 60) / 4))
        while not self._stopping.is_set():
            try:
                self.expire(utcnow())
            except Exception:
                log.exception("retention sweep failed")
            self._stopping.wait(timeout=period)

    def expire(self, now: datetime) -> None:
        """Delete outputs and inputs older than the retention time (`data_removed: true`, output null)."""
        if not self.config.retention:
            return
        cutoff = now - timedelta(seconds=self.config.retention)
        for row in self.store.expired_predictions(cutoff):
            (self.config.outputs_dir / f"{row.id}.mp4").unlink(missing_ok=True)
            kept = {
                k: (None if isinstance(v, str) and v.startswith("data:") else v) for k, v in row.input.items()
            }
            self.store.transition(row.id, TERMINAL, output=None, data_removed=True, input=kept)
        for file in self.store.expired_files(now):
            self.files.delete(file.id)


class _StoreCollector:
    """Gauges read from the store at scrape time, so they are right across restarts."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Any:
        counts = self.service.store.counts_by_status()
        queue = GaugeMetricFamily("i2v_queue_depth", "Predictions waiting for a worker")
        queue.add_metric([], counts[QUEUED])
        by_status = GaugeMetricFamily(
            "i2v_predictions", "Predictions in the store, by status", labels=["status"]
        )
        for status, n in counts.items():
            by_status.add_metric([status], n)
        ready = GaugeMetricFamily(
            "i2v_worker_state", "Runner state (1 for the current one)", labels=["state"]
        )
        state = self.service.runner.state()
        for name in ("STARTING", "READY", "BUSY", "SETUP_FAILED"):
            ready.add_metric([name], 1 if name == state else 0)
        yield from (queue, by_status, ready)

    def describe(self) -> list[Any]:
        return []


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))
