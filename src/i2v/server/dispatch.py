"""From the queue to the runner and back: jobs out to free workers, events in as status changes.

Predictions wait in the store (status `starting`) and go to the runner as `Job`s with their request and
the image bytes checked at create. The queue is FIFO within each mode: only the oldest queued prediction
of a mode may go, to a free worker that serves its mode and fits it, preferring one that already holds its
model (`routing.choose_worker`), so mixed traffic does not make one GPU swap models while another sits
idle, and a mode whose workers are all busy never holds up another mode. Runner events update the
store, wake `Prefer: wait` requests and send webhooks. While a worker downloads weights at set-up, the
downloads are kept for /health-check, logged, and each waiting prediction's logs say what it waits for.

Inputs and outputs are in the storage (`storage.py`: the data folder or a bucket); the worker puts the mp4
there itself, and the dispatcher checks it is there before the prediction succeeds.

Each status change is the store's compare-and-set, so a prediction ends once: whoever wins (a cancel, the
worker's outcome, a restart's recovery) calls `ended`, and a loser changes nothing. The writes that follow
runner events are retried until they land (`Store.until_written`): a full disk delays an outcome, never
loses it.

With several servers on one database the start is a claim (`Store.claim`), a worker's outcome lands
only while its server still holds the claim, and a prediction that ends on another server wakes the
requests waiting here through `wake` (the service hears of it from `peers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from ..progress import DownloadProgress
from ..request import IMAGE_FIELDS, MODES, ImageField, KlingRequest
from .admission import refusal
from .config import ServerConfig
from .housekeeping import Metrics
from .links import OutputLinks
from .routing import Head, choose_worker, stored_request
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
from .storage import Storage, input_key, output_key, poster_key
from .store import PredictionRow, StorageError, Store, utcnow
from .webhooks import WebhookSender

log = logging.getLogger(__name__)
T = TypeVar("T")
RECHECK_S = 5.0  # a waiting request reads its prediction again this often, should a wake-up be lost


class Dispatcher:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        runner: Runner,
        webhooks: WebhookSender,
        metrics: Metrics,
        storage: Storage,
        links: OutputLinks,
    ) -> None:
        self.config, self.store, self.runner = config, store, runner
        self.webhooks, self.metrics = webhooks, metrics
        self.storage, self.links = storage, links
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        self._pending = threading.Event()  # set when there may be something to dispatch
        self._downloads: dict[str, DownloadProgress] = {}  # by repo, while workers set up
        self._logged_tenths: dict[str, int] = {}
        self._told_waiting: set[str] = set()  # predictions whose logs say they wait for a download

    def kick(self) -> None:
        self._pending.set()

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self._pending.clear()  # before looking, so a kick during the look is not lost
            try:
                while self._dispatch_round():
                    pass
                if self.downloads():
                    self._tell_waiting()
            except Exception:
                log.exception("dispatch failed")
            self._pending.wait(timeout=1.0)

    def stop(self) -> None:
        self._pending.set()

    # weights downloading at set-up

    def downloads(self) -> list[DownloadProgress]:
        with self._lock:
            return list(self._downloads.values())

    def _downloading(self, progress: DownloadProgress | None) -> None:
        with self._lock:
            if progress is None:  # a worker moved on: loading, ready, failed
                self._downloads.clear()
            elif progress.finished:
                self._downloads.pop(progress.repo, None)
            else:
                self._downloads[progress.repo] = progress
        if progress is not None:
            tenth = 10 * progress.done // progress.total if progress.total else 10
            if self._logged_tenths.get(progress.repo) != tenth:
                self._logged_tenths[progress.repo] = tenth
                log.info("a worker is downloading %s", progress)

    def _tell_waiting(self) -> None:
        """Each queued prediction's logs say once that it waits for the weights, not a silent queue."""
        downloads = self.downloads()
        if not downloads:
            return
        line = (
            f"the worker is downloading the model weights ({'; '.join(map(str, downloads))}); this "
            "prediction waits in the queue until they are in"
        )
        for prediction_id in self.store.queued_ids():
            if prediction_id in self._told_waiting:
                continue
            row = self.store.prediction(prediction_id)
            if row is not None and self.store.transition(
                prediction_id, {QUEUED}, logs=row.logs + line + "\n"
            ):
                self._told_waiting.add(prediction_id)

    def _write(self, what: str, write: Callable[[], T]) -> T:
        return self.store.until_written(what, write)

    def _dispatch_round(self) -> bool:
        """Send one queued prediction to a free worker; False when there is nothing to send now."""
        workers = self.runner.workers()
        if not any(w.free for w in workers):
            return False
        heads: list[Head] = []
        for mode in MODES:  # each mode's oldest: FIFO within a mode
            if (row := self._write("the queue", lambda m=mode: self.store.next_queued(m))) is not None:
                heads.append((row, stored_request(row)))
        heads.sort(key=lambda head: head[0].seq)
        for row, request in heads:
            problem = refusal(request, workers) if request is not None else None
            if problem is not None:  # queued before the workers said what they can hold: it never runs
                self.finish(row.id, status=FAILED, error=f"{problem.field}: {problem.description}")
                return True
        choice = choose_worker(heads, workers)
        if choice is None:
            return False
        self._dispatch_one(*choice)
        return True

    def _dispatch_one(self, queued: PredictionRow, worker: WorkerView) -> bool:
        row = self._write(f"the start of {queued.id}", lambda: self.store.claim(queued.id))
        if row is None:  # canceled meanwhile, or another server's
            return True
        try:
            job = self._job(row)
        except ValueError as exc:
            self.finish(row.id, status=FAILED, error=str(exc))
            return True
        # Before the submit: the worker's first log line would otherwise send a progress webhook ahead of it.
        self._webhook(row, "start")
        self._write(
            f"a log line of {row.id}",
            lambda: self.store.append_log(row.id, f"running on worker {worker.name}"),
        )
        try:
            self.runner.submit(job, worker.index)
        except (RuntimeError, OSError) as exc:  # the worker went (died, or was taken) since its view
            self._back_to_queue(row.id, f"worker {worker.name} could not take it ({exc}); back in the queue")
            return True
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
                images[field] = self.storage.read(input_key(row.id, field))
            except OSError as exc:  # missing, or a storage that cannot be reached
                raise ValueError(
                    f"{field}: the image checked at create could not be read from "
                    f"{self.storage.describe()} ({exc.strerror or exc})"
                ) from None
        return Job(id=row.id, request=request, images=images, output=output_key(row.id), storage=self.storage)

    # requests waiting on a prediction

    async def wait(self, prediction_id: str, timeout: float) -> PredictionRow | None:
        """The prediction once it has ended, or as it is when `timeout` seconds have passed."""
        loop, done = asyncio.get_running_loop(), asyncio.Event()
        deadline = loop.time() + timeout
        with self._lock:
            self._waiters.setdefault(prediction_id, []).append((loop, done))
        try:
            row = await asyncio.to_thread(self.store.prediction, prediction_id)
            while row is not None and row.status not in TERMINAL and (left := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), min(left, RECHECK_S))
                done.clear()
                row = await asyncio.to_thread(self.store.prediction, prediction_id)
            return row
        finally:
            with self._lock:
                self._waiters[prediction_id].remove((loop, done))
                if not self._waiters[prediction_id]:
                    del self._waiters[prediction_id]

    def wake(self, prediction_id: str | None = None) -> None:
        """Requests waiting on `prediction_id` (all, with None) read it again: it ended, maybe elsewhere."""
        with self._lock:
            waiters = [w for key, ws in self._waiters.items() if prediction_id in (None, key) for w in ws]
        for loop, done in waiters:
            loop.call_soon_threadsafe(done.set)

    # cancels

    def cancel(self, row: PredictionRow) -> None:
        """A queued prediction ends here (StorageError when that cannot be recorded: nothing changed); a
        running one is told to stop, and its worker's `Canceled` ends it."""
        if row.status == QUEUED:
            done = self.store.transition(row.id, {QUEUED}, status=CANCELED, completed_at=utcnow())
            if done is not None:
                self.ended(done)
                return
            row = self.store.prediction(row.id) or row  # it started (or ended) meanwhile
        if row.status == RUNNING:
            try:
                self.store.transition(row.id, {RUNNING}, cancel_requested=True)
            except StorageError as exc:  # the worker is told anyway; its outcome is retried until stored
                log.error("prediction %s: could not record its cancel request (%s)", row.id, exc)
            self.runner.cancel(row.id)  # the worker stops at its next step and reports Canceled

    # runner events (from the runner's threads)

    def on_event(self, event: Event) -> None:
        """Called on the runner's threads, one worker's events in order; a write the database refuses is
        retried here until it lands, so later events of that worker wait behind it."""
        try:
            self._handle(event)
        except Exception:
            log.exception("handling %r failed", event)

    def _handle(self, event: Event) -> None:
        match event:
            case StateChanged(state, detail, download):
                if state == "SETUP_FAILED":
                    log.error("worker setup failed: %s", detail)
                self._downloading(download)
                self.kick()
            case Started() | Capacity() | Holding():
                pass  # the dispatcher already marked it processing; the runner keeps what workers hold
            case Log(prediction_id, line):
                row = self._write(
                    f"a log line of {prediction_id}", lambda: self.store.append_log(prediction_id, line)
                )
                if row is not None and row.webhook and "logs" in row.webhook_events_filter:
                    self.webhooks.send_progress(
                        row.id, row.owner, row.webhook, "logs", lambda: self._progress_body(prediction_id)
                    )
            case Succeeded(prediction_id, predict_time, info):
                key = output_key(prediction_id)
                if not self._stored(key):
                    self.finish(
                        prediction_id,
                        status=FAILED,
                        error=f"the output video is missing from {self.storage.describe()}",
                    )
                    return
                self.finish(
                    prediction_id,
                    status=SUCCEEDED,
                    output=key.rpartition("/")[2],
                    predict_time=predict_time,
                    log_line=f"seed: {info.seed}" if info is not None else None,
                )
            case Failed(prediction_id, error, worker_lost):
                if worker_lost and self._run_again(prediction_id):
                    return
                self.finish(prediction_id, status=FAILED, error=error)
            case Canceled(prediction_id):
                self.finish(prediction_id, status=CANCELED)

    def _requeue(self, prediction_id: str, line: str, **changes: Any) -> PredictionRow | None:
        """A prediction this server runs goes back to the queue at its place, `line` added to its logs; the
        row as it now is, or None when it had moved on."""
        row = self._write(
            f"the return of {prediction_id} to the queue",
            lambda: self.store.transition(
                prediction_id,
                {RUNNING},
                held_by=self.store.claimant,
                status=QUEUED,
                started_at=None,
                claimed_by=None,
                logs=PredictionRow.logs + line + "\n",
                **changes,
            ),
        )
        if row is not None:
            self.kick()
        return row

    def _back_to_queue(self, prediction_id: str, line: str) -> None:
        """A claimed prediction that never reached a worker: queued again whatever the retry setting (it has
        not run, so its attempt does not count), unless it was canceled meanwhile."""
        log.warning("prediction %s: %s", prediction_id, line)
        row = self._requeue(prediction_id, line, attempts=PredictionRow.attempts - 1)
        if row is not None and row.cancel_requested:
            self.finish(prediction_id, status=CANCELED)

    def _run_again(self, prediction_id: str) -> bool:
        """With `retry_on_restart`, a prediction whose worker died goes back to the queue's front, once."""
        row = self._write(f"the retry of {prediction_id}", lambda: self.store.prediction(prediction_id))
        if not self.config.retry_on_restart or row is None or row.attempts >= 2 or row.cancel_requested:
            return False
        again = self._requeue(
            prediction_id, "the worker process died while this prediction ran; running it again"
        )
        if again is not None:
            log.warning("prediction %s: its worker died; running it again", prediction_id)
        return again is not None

    def finish(
        self, prediction_id: str, *, status: Status, log_line: str | None = None, **changes: Any
    ) -> None:
        """End a prediction with `status` if it has not ended yet (compare-and-set), retried until stored."""
        what = f"the outcome of {prediction_id} ({status})"
        current = self._write(what, lambda: self.store.prediction(prediction_id))
        if current is None:
            return
        if "predict_time" not in changes and current.started_at is not None:
            changes["predict_time"] = (utcnow() - current.started_at).total_seconds()
        if log_line:
            changes["logs"] = PredictionRow.logs + log_line + "\n"
        row = self._write(
            what,
            lambda: self.store.transition(
                prediction_id,
                {RUNNING},
                held_by=self.store.claimant,  # a claim another server recovered is no longer ours to end
                status=status,
                completed_at=utcnow(),
                **changes,
            ),
        )
        if row is None:  # it had ended already (canceled meanwhile, or a late report): what was decided stays
            if status == SUCCEEDED and current.status != SUCCEEDED:  # nobody will serve it
                for key in (output_key(prediction_id), poster_key(prediction_id)):
                    with contextlib.suppress(OSError):
                        self.storage.delete(key)
            return
        self.ended(row)
        self.kick()

    def ended(self, row: PredictionRow) -> None:
        """What follows a prediction's end: its inputs go, waiting requests wake, the terminal webhook.

        Never raises: the end is already recorded, so a caller (a cancel) has succeeded whatever follows.
        An input file that cannot be removed now is removed at the next start."""
        for field in IMAGE_FIELDS:
            if field not in row.input:
                continue
            try:
                self.storage.delete(input_key(row.id, field))
            except OSError as exc:
                log.warning("prediction %s: could not remove its %s input (%s)", row.id, field, exc)
        self.metrics.ended(row)
        self.wake(row.id)
        self._told_waiting.discard(row.id)
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
        body = _json(self._body(row))
        self.webhooks.send(row.id, row.owner, row.webhook, event, body, terminal=terminal)

    def _stored(self, key: str) -> bool:
        try:
            return self.storage.stat(key) is not None
        except OSError as exc:
            log.error("could not check %s in %s (%s)", key, self.storage.describe(), exc)
            return False

    def _body(self, row: PredictionRow) -> dict[str, Any]:
        base = self.config.base_url(row.base_url)
        return prediction_body(row, base, self.links.url(row, base))

    def _progress_body(self, prediction_id: str) -> str | None:
        row = self.store.prediction(prediction_id)
        if row is None or row.status in TERMINAL:
            return None
        return _json(self._body(row))


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))
