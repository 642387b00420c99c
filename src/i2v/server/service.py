"""The service behind the routes, and their only door: predictions, files, the webhook secret, health.

It puts the pieces together and applies the per-token limits; each piece lives in its own module:
`intake` (what a create must pass), `dispatch` (queue -> runner -> status changes), `housekeeping`
(metrics, retention), `store` (the rows), `storage` (the bytes: data folder or bucket), `links` (output
URLs), `files`, `webhooks`, `peers` (the other servers on one database). Nothing here imports torch: the
model runs behind `Runner`.

With several servers on one database (PostgreSQL) the service also hears the others (`peers`: a
prediction that ended, a cancel for one running here, new work) and sweeps every `SWEEP_S` for claims of
servers that are gone (their running predictions fail or run again, their webhooks are sent from here).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, Generic, NoReturn, TypeVar

from ..parsing import format_bytes
from ..request import IMAGE_FIELDS
from .admission import refusal
from .bodies import BodyBudget
from .config import ServerConfig
from .dispatch import Dispatcher
from .files import Files, new_id
from .housekeeping import Metrics, Retention
from .intake import Checked, Intake
from .limits import IntakeSlots, Limiter, SlotsBusy, rate_limiter
from .links import OutputLinks, link_key
from .peers import link
from .runner import Runner, WorkerView
from .schemas import APIError, CreatePrediction, InvalidField, invalid, not_found
from .states import QUEUED, SUCCEEDED
from .storage import input_key, output_key, poster_key
from .store import FileRow, PredictionRow, StorageError, Store, utcnow
from .webhooks import WebhookSecrets, WebhookSender

log = logging.getLogger(__name__)

PAGE_SIZE = 100
SWEEP_S = 5.0  # several servers: how often each looks for claims of servers that are gone
# Several servers on one data dir: a file left behind is removed at start only once it is this old, so a
# server starting never removes what another is writing (an upload, an input before its row, a video).
ORPHAN_AGE_S = 3600.0
Row = TypeVar("Row", PredictionRow, FileRow)


@dataclass(frozen=True)
class Page(Generic[Row]):
    """One page of a list, newest first; the cursors are opaque (None where there is no such page)."""

    rows: list[Row]
    next_cursor: str | None
    previous_cursor: str | None


class Service:
    def __init__(self, config: ServerConfig, runner: Runner, store: Store | None = None) -> None:
        self.config = config
        self.runner = runner
        self.storage = config.storage()
        self.storage.check()
        self.store = store or Store(config.store_url)
        self.peers = link(self.store)
        self.files = Files(self.store, self.storage, config.retention)
        key = link_key(config.data_dir, config.output_url_secret, self.store)
        self.links = OutputLinks(config, self.storage, key)
        self.intake = Intake(config, self.store, self.files)
        self.secrets = WebhookSecrets(config.data_dir, config.webhook_secret, self.store)
        self.webhooks = WebhookSender(
            self.store,
            self.secrets,
            retry_delays=config.webhook_retry_delays,
            guard=self.intake.pin_webhook,
        )
        self.request_limit = rate_limiter(self.store, "requests", config.request_rate)
        self.create_limit = rate_limiter(self.store, "creates", config.create_rate)
        self.intake_slots = IntakeSlots(config.fetches_per_token, config.fetches_total)
        self.bodies = BodyBudget(config.body_memory)
        self.metrics = Metrics(self.store, runner, self.bodies)
        self.dispatcher = Dispatcher(
            config, self.store, runner, self.webhooks, self.metrics, self.storage, self.links
        )
        self.retention = Retention(config, self.store, self.files, self.storage)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # lifecycle

    def start(self) -> None:
        # First hold this server's liveness (several servers): nobody may take its claims for a dead one's.
        self.peers.start(self._heard, self._look_again)
        # SQLite: every claim but ours is a stopped server's; several servers: those whose server is gone.
        lost = self.store.gone(self.store.claimants()) if self.store.shared else None
        self._recover(lost, "after restart")
        self._remove_orphans(ORPHAN_AGE_S if self.store.shared else 0.0)
        self._say_how_urls_are_made()
        self.webhooks.start(lost)
        self.runner.start(self.dispatcher.on_event)
        self._spawn(self.dispatcher.run, "dispatcher")
        if self.config.retention:
            self._spawn(self.retention.run, "retention")
        if self.store.shared:
            self._spawn(self._sweep, "sweep")

    def _recover(self, claimants: set[int | None] | None, when: str) -> None:
        """Predictions left running by stopped servers fail or run again; their ends follow as any end."""
        requeued, failed = self.store.recover_interrupted(self.config.retry_on_restart, claimants)
        if requeued or failed:
            log.warning(
                "%s: %d interrupted prediction(s) queued again, %d failed", when, len(requeued), len(failed)
            )
        for prediction_id in failed:
            if row := self.store.prediction(prediction_id):
                self.dispatcher.ended(row)
        if requeued:
            self.dispatcher.kick()

    # several servers on one database

    def _heard(self, kind: str, prediction_id: str) -> None:
        """Another server's change: new work, a cancel for a prediction that may run here, an end."""
        if kind == "queued":
            self.dispatcher.kick()
        elif kind == "cancel":
            self.runner.cancel(prediction_id)  # nothing happens unless it runs here
        elif kind == "ended":
            self.dispatcher.wake(prediction_id)

    def _look_again(self) -> None:
        """What messages may have said while the connection was down, read from the rows."""
        self.dispatcher.kick()
        self.dispatcher.wake()
        self._cancel_requested_here()

    def _cancel_requested_here(self) -> None:
        for prediction_id in self.store.cancels_requested_here():
            self.runner.cancel(prediction_id)

    def _sweep(self, stopping: threading.Event) -> None:
        while not stopping.wait(SWEEP_S):
            try:
                lost = self.store.gone(self.store.claimants())
                if lost:
                    self._recover(lost, "a server stopped")
                    if adopted := self.webhooks.adopt(lost):
                        log.warning("a server stopped: %d of its webhook(s) are sent from here", adopted)
                self._cancel_requested_here()  # should a cancel's message have been missed
            except StorageError as exc:
                log.warning("the sweep for stopped servers could not read the database (%s)", exc)
            except Exception:
                log.exception("the sweep for stopped servers failed")

    def _spawn(self, target: Callable[[threading.Event], None], name: str) -> None:
        thread = threading.Thread(target=target, args=(self._stopping,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        self.dispatcher.stop()
        self.runner.stop()
        self.webhooks.stop()
        self.intake_slots.stop()
        self.peers.stop()  # after the workers: what still ran here is now free for others to recover
        self.store.close()

    def _remove_orphans(self, min_age: float) -> None:
        """What a killed server left behind: inputs of predictions no longer waiting, half-written uploads
        and videos. (A running server removes them as it goes; a SIGKILL leaves them.) With `min_age`, only
        those untouched that long (another server may be writing the younger ones)."""
        waiting = self.store.unfinished_ids()
        cutoff = datetime.now(UTC) - timedelta(seconds=min_age)
        removed = self.storage.sweep(min_age)
        for key, modified in list(self.storage.keys("inputs/")):
            if key.removeprefix("inputs/").partition(".")[0] in waiting or modified > cutoff:
                continue
            try:
                self.storage.delete(key)
                removed += 1
            except (OSError, ValueError) as exc:
                log.warning("could not remove the orphan input %s (%s)", key, exc)
        if removed:
            log.warning(
                "removed %d file(s) left behind by an earlier server (inputs, partial writes)", removed
            )

    def _say_how_urls_are_made(self) -> None:
        if self.config.public_url:
            return
        if self.config.trusted_hosts:
            log.info("URLs in answers are built from the Host header, one of I2V_TRUSTED_HOSTS")
        else:
            log.warning(
                "I2V_PUBLIC_URL is not set: URLs in answers and webhooks are built from each request's Host "
                "header; set I2V_PUBLIC_URL to the address clients use, or I2V_TRUSTED_HOSTS to the host "
                "names they may send"
            )

    # access

    def base_url(self, request_base: str) -> str:
        return self.config.base_url(request_base)

    def check_request_rate(self, owner: str) -> None:
        self._check_rate(self.request_limit, owner, "requests")

    def _check_rate(self, limiter: Limiter, owner: str, what: str) -> None:
        wait = limiter.acquire(owner)
        if wait:
            per_minute = int(limiter.capacity)
            raise APIError(
                429,
                "Too many requests",
                f"this token may make {per_minute} {what} a minute; try again in {wait} s",
                headers={"retry-after": str(wait)},
            )

    # models

    def model_known(self, owner: str, name: str) -> bool:
        return f"{owner}/{name}" in self.config.model_names

    def resolve_version(self, version: str, current: str) -> str:
        """The model name for a `version`: a known version id (filed under the first model name,
        kwaivgi/kling-v2.1, as Replicate files it), `owner/name` or `owner/name:id`."""
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

    def run_count(self) -> int:
        return sum(self.store.counts_by_status().values())

    # predictions

    async def create(
        self, model: str, version: str, body: CreatePrediction, base: str, owner: str = ""
    ) -> PredictionRow:
        """Check, fetch and store one prediction: either it is stored (and queued) or nothing is.

        The slow part (the webhook's DNS, fetching and decoding the images) runs in the intake's own
        threads, a few creates per token at once (`IntakeSlots`), within `fetch_timeout` seconds in all."""
        loop = asyncio.get_running_loop()
        timeout = self.config.fetch_timeout or 30.0
        try:
            async with self.intake_slots.slot(owner, loop.time() + timeout) as lease:
                try:
                    checked = await lease.run(self.intake.check, body)
                except TimeoutError:
                    raise self._too_slow(["webhook"], timeout) from None
                # Refused at once when no worker can ever run it, never queued to fail later.
                if (problem := refusal(checked.request, self.runner.workers())) is not None:
                    raise invalid("Input validation failed", [problem])
                await asyncio.to_thread(self._check_rate, self.create_limit, owner, "predictions")
                await asyncio.to_thread(self._check_unfinished, owner)  # again, exactly, at the insert
                try:
                    images = await lease.run(self.intake.images, checked.request, base, owner)
                except TimeoutError:
                    fields = [f for f in IMAGE_FIELDS if getattr(checked.request, f) is not None]
                    raise self._too_slow([f"input.{f}" for f in fields], timeout) from None
        except SlotsBusy as busy:
            who = "this token's" if busy.whose == "token" else "the server's"
            raise APIError(
                429,
                "Too many requests",
                f"{who} image intake is full (creates fetching or decoding images: at most "
                f"{self.config.fetches_per_token} per token, {self.config.fetches_total} in all); "
                "try again in a few seconds",
                headers={"retry-after": "5"},
            ) from None
        return await asyncio.to_thread(self._add, model, version, checked, images, base, owner)

    @staticmethod
    def _too_slow(fields: list[str], timeout: float) -> APIError:
        rule = f"fetching it did not finish within {timeout:g} s (I2V_FETCH_TIMEOUT)"
        problems = [InvalidField(type="timeout", field=field, description=rule) for field in fields]
        return invalid("Input validation failed", problems)

    def _add(
        self,
        model: str,
        version: str,
        checked: Checked,
        images: dict[str, bytes],
        base: str,
        owner: str,
    ) -> PredictionRow:
        prediction_id = new_id()
        ignored = checked.ignored
        row = PredictionRow(
            id=prediction_id,
            model=model,
            version=version,
            input=checked.request.model_dump(mode="json", exclude_unset=True),  # what was checked, no more
            status=QUEUED,
            logs=f"ignored unknown input field(s): {', '.join(ignored)}\n" if ignored else "",
            created_at=utcnow(),
            webhook=checked.webhook,
            webhook_events_filter=checked.events,
            base_url=base,
            attempts=0,
            data_removed=False,
            cancel_requested=False,
            owner=owner,
        )
        saved: list[str] = []
        try:
            for field, data in images.items():
                saved.append(input_key(prediction_id, field))  # type: ignore[arg-type]
                self.storage.put_bytes(saved[-1], data, "application/octet-stream")  # StorageError: 507
            if not self.store.add_prediction(row, self.config.max_unfinished):
                self._too_many()
        except BaseException:
            for key in saved:
                with contextlib.suppress(OSError):  # else removed at the next start
                    self.storage.delete(key)
            raise
        self.dispatcher.kick()
        return row

    def _check_unfinished(self, owner: str) -> None:
        limit = self.config.max_unfinished
        if limit and self.store.count_unfinished(owner) >= limit:
            self._too_many()

    def _too_many(self) -> NoReturn:
        limit = self.config.max_unfinished
        raise APIError(
            429,
            "Too many predictions",
            f"this token already has {limit} predictions waiting or running, the most it may; "
            "wait for some to finish (or cancel them) before creating more",
        )

    def get(self, prediction_id: str, owner: str | None = None) -> PredictionRow:
        """The prediction; with `owner`, another token's reads as missing (404), as if it did not exist."""
        row = self.store.prediction(prediction_id, owner)
        if row is None:
            raise not_found(f"prediction {prediction_id}")
        return row

    def cancel(self, prediction_id: str, owner: str | None = None) -> PredictionRow:
        self.dispatcher.cancel(self.get(prediction_id, owner))
        return self.get(prediction_id)

    async def wait(self, prediction_id: str, timeout: float) -> PredictionRow:
        """The prediction once it has ended, or as it is when `timeout` seconds have passed."""
        row = await self.dispatcher.wait(prediction_id, timeout)
        if row is None:
            raise not_found(f"prediction {prediction_id}")
        return row

    def output(self, prediction_id: str, owner: str) -> str:
        """The storage key of the mp4 of one of the owner's predictions (404 while there is none, or once
        it was removed)."""
        row = self.get(prediction_id, owner)
        if not row.output or row.data_removed:
            raise not_found(f"output of prediction {prediction_id}")
        return output_key(row.id)

    def signed_output(self, name: str, expires: str | None, signature: str | None) -> tuple[str, int]:
        """The storage key a signed output link names, once the link checks out (403 saying why, if not),
        and the seconds the link has left."""
        key = output_key(self.links.verify(name, expires, signature))
        return key, self.links.remaining(expires or "0")

    def output_url(self, row: PredictionRow, base: str) -> str | None:
        return self.links.url(row, base)

    def poster(self, prediction_id: str, owner: str) -> bytes:
        """The JPEG poster of one of the owner's outputs, as its worker stored it. An output from before
        posters were stored gets one made from its file now (kept for next time)."""
        mp4_key = self.output(prediction_id, owner)  # 404 unless the owner's and still there
        if self.storage.stat(mp4_key) is None:
            raise not_found(f"output of prediction {prediction_id}")
        key = poster_key(prediction_id)
        try:
            return self.storage.read(key)
        except FileNotFoundError:
            mp4 = self.storage.local_path(mp4_key)
            if mp4 is None or not mp4.is_file():
                raise not_found(f"poster of prediction {prediction_id}") from None
        from ..video import poster_jpeg

        data = poster_jpeg(mp4)
        with contextlib.suppress(OSError):
            self.storage.put_bytes(key, data, "image/jpeg")
        return data

    def recent_succeeded(self, limit: int) -> list[PredictionRow]:
        """The newest succeeded predictions of every owner, for the page's time estimates (timings only
        leave the service through page_api, never inputs or outputs)."""
        return self.store.recent(SUCCEEDED, limit)

    def predictions(self, cursor: str | None, owner: str) -> Page[PredictionRow]:
        return self._page(PredictionRow, cursor, owner)

    # files

    def upload(
        self, stream: BinaryIO, name: str, content_type: str, meta: dict[str, Any], owner: str
    ) -> FileRow:
        return self.files.save(stream, name, content_type, meta, owner)

    def file(self, file_id: str, owner: str) -> FileRow:
        row = self.store.file(file_id, owner)  # only the token's own: others' read as missing
        if row is None:
            raise not_found(f"file {file_id}")
        return row

    def file_key(self, row: FileRow) -> str:
        return self.files.key(row.id)

    def delete_file(self, file_id: str, owner: str) -> None:
        if not self.files.delete(file_id, owner):
            raise not_found(f"file {file_id}")

    def list_files(self, cursor: str | None, owner: str) -> Page[FileRow]:
        return self._page(FileRow, cursor, owner)

    # webhooks, health, metrics, retention

    def webhook_secret(self, owner: str) -> str:
        """The secret that signs this token's webhooks (each token its own unless the operator set one)."""
        return self.secrets.for_owner(owner)

    def account(self, owner: str) -> dict[str, str | None]:
        """Replicate's account shape for the caller's token (named after its owner id, never the token)."""
        username = f"token-{owner[:12]}" if owner else "i2v"
        return {"type": "user", "username": username, "name": username, "github_url": None}

    def health(self) -> dict[str, Any]:
        state = self.runner.state()
        body: dict[str, Any] = {"status": state, "queue_depth": self.store.counts_by_status()[QUEUED]}
        if state == "SETUP_FAILED":
            body["setup"] = {"status": "failed", "logs": self.runner.setup_error()}
        elif downloads := self.dispatcher.downloads():  # a worker fetching weights as it sets up
            body["setup"] = {
                "status": "downloading",
                "logs": "; ".join(map(str, downloads)),
                "downloads": [
                    {"model": d.model, "repo": d.repo, "bytes_done": d.done, "bytes_total": d.total}
                    for d in downloads
                ],
            }
        workers = self.runner.workers()
        if workers:
            body["workers"] = [_worker_health(w) for w in workers]
        return body

    def metrics_text(self) -> bytes:
        return self.metrics.exposition()

    def expire(self, now: datetime) -> None:
        self.retention.expire(now)

    # pages

    def _page(self, model: type[Row], cursor: str | None, owner: str) -> Page[Row]:
        """Newest first, PAGE_SIZE a page, with opaque cursors to the next and previous pages."""
        after = before = None
        if cursor:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
                after, before = decoded.get("a"), decoded.get("b")
                # exactly int: JSON's true is a Python bool, which is an int too
                if not all(v is None or (type(v) is int and abs(v) < 2**62) for v in (after, before)):
                    raise ValueError("not a position")
            except (binascii.Error, ValueError, AttributeError, RecursionError):
                raise APIError(400, "Invalid request", "the cursor is not one this server made") from None
        store = self.store
        rows, more = store.page(model, after=after, before=before, limit=PAGE_SIZE, owner=owner)
        older = newer = False
        if rows:
            if before is None:
                older, newer = more, after is not None and store.exists_newer(model, rows[0].seq, owner)
            else:
                older, newer = store.exists_older(model, rows[-1].seq, owner), more
        return Page(
            rows=rows,
            next_cursor=_cursor({"a": rows[-1].seq}) if older else None,
            previous_cursor=_cursor({"b": rows[0].seq}) if newer else None,
        )


def _worker_health(worker: WorkerView) -> dict[str, Any]:
    """One worker in /health-check: its device and modes, its budget, what it can serve and holds."""
    body: dict[str, Any] = {"worker": worker.name, "state": worker.state, "modes": list(worker.modes)}
    capacity = worker.capacity
    if capacity is not None:
        budget = capacity.budget_bytes
        body["memory_budget"] = format_bytes(budget) if budget is not None else None
        body["serves"] = [
            {
                "mode": o.mode,
                "preset": o.preset,
                "model": o.model,
                "placement": o.placement,
                "durations": list(o.durations),
                "peak_memory": format_bytes(o.peak_bytes),
                **({"reason": o.reason} if o.reason else {}),
            }
            for o in capacity.offers
        ]
        body["holds"] = list(worker.holds)
    return body


def _cursor(value: dict[str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")
