"""From the queue to the runner and back: jobs out to free workers, events in as status changes.

Predictions wait in the store (status `starting`) and go to the runner as `Job`s with their request and
the image bytes checked at create. The queue is FIFO within each mode: only the oldest queued prediction
of a mode may go, and it goes to a free worker that serves its mode and fits it (`WorkerView.can_run`),
preferring one that already holds its model, so mixed traffic does not make one GPU swap models while
another sits idle; a mode whose workers are all busy never holds up another mode. Runner events update
the store, wake `Prefer: wait` requests and send webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import Any

from pydantic import ValidationError

from ..request import IMAGE_FIELDS, MODES, ImageField, KlingRequest
from .admission import refusal
from .config import ServerConfig
from .housekeeping import Metrics
from .runner import (
    Canceled,
    Capacity,
    Event,
    Failed,
    Holding,
    Job,
    Log,
    Runner,
    Started,
    StateChanged,
    Succeeded,
    WorkerView,
)
from .schemas import prediction_body
from .states import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, Status, WebhookEvent
from .store import PredictionRow, Store, utcnow
from .webhooks import WebhookSender

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        runner: Runner,
        webhooks: WebhookSender,
        metrics: Metrics,
    ) -> None:
        self.config, self.store, self.runner = config, store, runner
        self.webhooks, self.metrics = webhooks, metrics
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        self._pending = threading.Event()  # set when there may be something to dispatch

    def kick(self) -> None:
        self._pending.set()

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self._pending.clear()  # before looking, so a kick during the look is not lost
            try:
                while self._dispatch_round():
                    pass
            except Exception:
                log.exception("dispatch failed")
            self._pending.wait(timeout=1.0)

    def stop(self) -> None:
        self._pending.set()

    def _dispatch_round(self) -> bool:
        """Send one queued prediction to a free worker; False when there is nothing to send now."""
        workers = self.runner.workers()
        free = [w for w in workers if w.free]
        if not free:
            return False
        heads: list[tuple[PredictionRow, KlingRequest | None]] = []
        for mode in MODES:
            if (row := self.store.next_queued(mode)) is not None:
                heads.append((row, _request(row)))
        heads.sort(key=lambda head: head[0].seq)
        for row, request in heads:
            problem = refusal(request, workers) if request is not None else None
            if problem is not None:  # queued before the workers said what they hold: it can never run
                self.finish(row.id, status=FAILED, error=f"{problem.field}: {problem.description}")
                return True
        choice = choose_worker(heads, workers)
        if choice is None:
            return False
        queued, worker = choice
        self._dispatch_one(queued, worker)
        return True

    def _dispatch_one(self, queued: PredictionRow, worker: WorkerView) -> bool:
        row = self.store.transition(
            queued.id, {QUEUED}, status=RUNNING, started_at=utcnow(), attempts=queued.attempts + 1
        )
        if row is None:  # canceled meanwhile
            return True
        try:
            job = self._job(row)
        except ValueError as exc:
            self.finish(row.id, status=FAILED, error=str(exc))
            return True
        self._webhook(row, "start")
        self.store.append_log(row.id, f"running on worker {worker.name}")
        self.runner.submit(job, worker.index)
        if (latest := self.store.prediction(row.id)) and latest.cancel_requested:
            self.runner.cancel(row.id)  # a cancel that came between the queue and the worker
        return True

    def _job(self, row: PredictionRow) -> Job:
        """The job for a stored prediction: its input parsed back into the request model (the durable
        queue keeps the JSON the client sent), and the image bytes checked at create."""
        try:
            request = KlingRequest.model_validate(row.input)
        except ValidationError as exc:
            raise ValueError(f"the stored input no longer validates: {exc}") from None
        images: dict[ImageField, bytes] = {}
        for field in IMAGE_FIELDS:
            if getattr(request, field) is None:
                continue
            try:
                images[field] = self.config.input_path(row.id, field).read_bytes()
            except OSError:
                raise ValueError(
                    f"{field}: the image checked at create is missing from the data folder"
                ) from None
        return Job(id=row.id, request=request, images=images, output=str(self.config.output_path(row.id)))

    # requests waiting on a prediction

    async def wait(self, prediction_id: str, timeout: float) -> PredictionRow | None:
        """The prediction once it has ended, or as it is when `timeout` seconds have passed."""
        loop, done = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            self._waiters.setdefault(prediction_id, []).append((loop, done))
        try:
            row = await asyncio.to_thread(self.store.prediction, prediction_id)
            if row is not None and row.status not in TERMINAL:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout)
                row = await asyncio.to_thread(self.store.prediction, prediction_id)
            return row
        finally:
            with self._lock:
                self._waiters[prediction_id].remove((loop, done))
                if not self._waiters[prediction_id]:
                    del self._waiters[prediction_id]

    # cancels

    def cancel(self, row: PredictionRow) -> None:
        if row.status == QUEUED:
            done = self.store.transition(row.id, {QUEUED}, status=CANCELED, completed_at=utcnow())
            if done is not None:
                self.ended(done)
                return
            row = self.store.prediction(row.id) or row
        if row.status == RUNNING:
            self.store.transition(row.id, {RUNNING}, cancel_requested=True)
            self.runner.cancel(row.id)  # the worker stops at its next step and reports Canceled

    # runner events (from the runner's threads)

    def on_event(self, event: Event) -> None:
        try:
            self._handle(event)
        except Exception:
            log.exception("handling %r failed", event)

    def _handle(self, event: Event) -> None:
        match event:
            case StateChanged(state, detail):
                if state == "SETUP_FAILED":
                    log.error("worker setup failed: %s", detail)
                self.kick()
            case Started() | Capacity() | Holding():
                pass  # the dispatcher already marked it processing; the runner keeps what workers hold
            case Log(prediction_id, line):
                row = self.store.append_log(prediction_id, line)
                if row is not None and row.webhook and "logs" in row.webhook_events_filter:
                    self.webhooks.send_progress(
                        row.id, row.webhook, "logs", lambda: self._progress_body(prediction_id)
                    )
            case Succeeded(prediction_id, predict_time, info):
                output = self.config.output_path(prediction_id)
                if not output.is_file():
                    self.finish(
                        prediction_id, status=FAILED, error="the output video is missing from the data folder"
                    )
                    return
                self.finish(
                    prediction_id,
                    status=SUCCEEDED,
                    output=output.name,
                    predict_time=predict_time,
                    log_line=f"seed: {info.seed}" if info is not None else None,
                )
            case Failed(prediction_id, error, worker_lost):
                if worker_lost and self._run_again(prediction_id):
                    return
                self.finish(prediction_id, status=FAILED, error=error)
            case Canceled(prediction_id):
                self.finish(prediction_id, status=CANCELED)

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
            self.kick()
        return again is not None

    def finish(
        self, prediction_id: str, *, status: Status, log_line: str | None = None, **changes: Any
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
                self.config.output_path(prediction_id).unlink(missing_ok=True)
            return
        self.ended(row)
        self.kick()

    def ended(self, row: PredictionRow) -> None:
        """What follows a prediction's end: its inputs go, waiting requests wake, the terminal webhook."""
        for field in IMAGE_FIELDS:
            self.config.input_path(row.id, field).unlink(missing_ok=True)
        self.metrics.ended(row)
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

    def _webhook(self, row: PredictionRow, event: WebhookEvent, *, terminal: bool = False) -> None:
        if not row.webhook or event not in row.webhook_events_filter:
            return
        body = _json(prediction_body(row, self.config.base_url(row.base_url)))
        self.webhooks.send(row.id, row.webhook, event, body, terminal=terminal)

    def _progress_body(self, prediction_id: str) -> str | None:
        row = self.store.prediction(prediction_id)
        if row is None or row.status in TERMINAL:
            return None
        return _json(prediction_body(row, self.config.base_url(row.base_url)))


def _request(row: PredictionRow) -> KlingRequest | None:
    try:
        return KlingRequest.model_validate(row.input)
    except ValidationError:
        return None  # `_job` fails it with the reason


def choose_worker(
    heads: list[tuple[PredictionRow, KlingRequest | None]], workers: tuple[WorkerView, ...]
) -> tuple[PredictionRow, WorkerView] | None:
    """Which queued head goes to which free worker. Oldest head first, to a free worker that already
    holds its model if there is one, else to the free worker able to run it whose models the other
    heads need least. One exception: a head whose model a busy worker holds waits for it (it is next
    there) while a younger head's model is held by a free worker, which takes that one instead, so two
    models do not swap places on two GPUs."""
    free = [w for w in workers if w.free]
    busy = [w for w in workers if not w.free]

    def holder(request: KlingRequest | None) -> WorkerView | None:
        return next(
            (w for w in free if request is None or (w.can_run(request) and w.holds_model_for(request))), None
        )

    holders = [holder(request) for _, request in heads]
    for index, (row, request) in enumerate(heads):
        if holders[index] is not None:
            return row, holders[index]  # type: ignore[return-value]
        assert request is not None  # a head that does not validate has a holder (any free worker)
        able = [w for w in free if w.can_run(request)]
        if not able:
            continue
        held_by_busy = any(w.can_run(request) and w.holds_model_for(request) for w in busy)
        if held_by_busy and any(h is not None for h in holders[index + 1 :]):
            continue
        needed = {
            offer.model
            for _, other in heads
            if other is not None and other is not request
            for w in free
            if (offer := w.offer(other)) is not None
        }
        return row, min(able, key=lambda w: (len(set(w.holds) & needed), w.index))
    return None


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))
