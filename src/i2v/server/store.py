"""The durable store: predictions, uploaded files and webhook deliveries, in SQLite (WAL) under the data dir
or, for several API servers, in one PostgreSQL database (`I2V_DATABASE_URL`); the same models on both, the
schema brought up to date at open by the migrations (`migrations/`).

Rows carry an integer `seq` in creation order: it gives FIFO order to the queue and stable cursors to lists.
Every method opens its own short transaction, so the store is safe to share between threads.

Several servers on one database (PostgreSQL): each store has a `claimant` key, held as an advisory lock
by that server's `Peers` while it lives. Starting a prediction is a claim (`claim`: `FOR UPDATE SKIP
LOCKED`, so two servers never take the same row), and a worker's outcome only lands while the claim is
still its server's; claims of a server that is gone (`gone`) are recovered by whichever server looks
first. Changes other servers must hear of (an end, a cancel request, a new queued prediction) are
announced with NOTIFY in the transaction that makes them, so the message goes out exactly when the change
commits. SQLite is one server (the data dir's lock) and takes the same paths with the dialect's
differences kept to a line each.

Every status change is a compare-and-set: one `UPDATE ... WHERE id = ? AND status IN (expected)` whose row
count says whether it happened, in portable SQLAlchemy Core (the same statement serves PostgreSQL). Whoever
wins ends the prediction; a late or racing writer (a worker's outcome after a cancel) changes nothing.

A write the database refuses (disk full, read-only, I/O error) is a `StorageError`. The HTTP side answers
it with 507; background writes that must land (a worker's outcome, a webhook's record) go through
`until_written`, which retries them, saying so once and counting the retries.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Engine,
    Float,
    Insert,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    InstrumentedAttribute,
    Mapped,
    Session,
    mapped_column,
    sessionmaker,
)

from ..errors import I2VError
from ..request import KlingRequest
from . import migrations
from .states import FAILED, QUEUED, RUNNING, STATUSES, TERMINAL, UNFINISHED, Status

DEFAULT_MODE: str = KlingRequest.model_fields["mode"].default
log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 2.0  # backoff of `until_written`
CHANNEL = "i2v"  # the NOTIFY channel of the servers on one PostgreSQL database (`Peers` listens)
# Connections per server: the HTTP threads, the dispatcher, the webhook senders and the intake share them.
POOL_SIZE, POOL_OVERFLOW = 10, 20
LIMIT_LOCKS = 0x1272  # the first half of the two-key advisory locks that serialise a token's creates


class StorageError(I2VError, OSError):
    """The data dir or the database refused a write (full, read-only, failing); the HTTP side answers 507."""


class DataDirInUse(I2VError):
    """Another server holds the data dir's lock."""


class _OverLimit(Exception):
    """Undoes a create over the queue limit (the session rolls back)."""


class DataDirNotShared(I2VError):
    """Servers on one database with different data dirs: one's inputs and outputs are not the other's."""


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every stored time is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


class AnyText(TypeDecorator[str]):
    """TEXT that takes any string: PostgreSQL's text cannot hold NUL (SQLite's can), so there a NUL that came
    in with a client's text (an unknown input key in the logs, a file name, a webhook URL, an error quoting
    them) is stored as U+FFFD instead of failing the write. JSON columns keep it (escaped, as JSON does)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and dialect.name == "postgresql" and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value


class Base(DeclarativeBase):
    pass


class PredictionRow(Base):
    __tablename__ = "predictions"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[Status] = mapped_column(String(16), index=True)
    output: Mapped[str | None] = mapped_column(String(300), default=None)  # file name under outputs/
    logs: Mapped[str] = mapped_column(AnyText, default="")
    error: Mapped[str | None] = mapped_column(AnyText, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    predict_time: Mapped[float | None] = mapped_column(Float, default=None)
    data_removed: Mapped[bool] = mapped_column(Boolean, default=False)
    webhook: Mapped[str | None] = mapped_column(AnyText, default=None)
    webhook_events_filter: Mapped[list[str]] = mapped_column(JSON, default=list)
    base_url: Mapped[str] = mapped_column(AnyText)  # the origin the client used; for URLs in webhooks
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    owner: Mapped[str] = mapped_column(String(64), default="", index=True)  # limits.token_owner of its token
    claimed_by: Mapped[int | None] = mapped_column(BigInteger, default=None)  # the running server's key


class FileRow(Base):
    __tablename__ = "files"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    name: Mapped[str] = mapped_column(AnyText)
    content_type: Mapped[str] = mapped_column(AnyText)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    md5: Mapped[str] = mapped_column(String(32))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    owner: Mapped[str] = mapped_column(String(64), default="", index=True)


class DeliveryRow(Base):
    """One webhook message; terminal ones are retried until delivered or given up, across restarts."""

    __tablename__ = "webhook_deliveries"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)  # the webhook-id header
    prediction_id: Mapped[str] = mapped_column(String(40), index=True)
    url: Mapped[str] = mapped_column(AnyText)
    event: Mapped[str] = mapped_column(String(16))
    terminal: Mapped[bool] = mapped_column(Boolean)
    body: Mapped[str] = mapped_column(AnyText)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str] = mapped_column(String(64), default="")  # whose secret signs it
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(AnyText, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    claimed_by: Mapped[int | None] = mapped_column(BigInteger, default=None)  # the sending server's key


class RateBucket(Base):
    """One token bucket of a rate limit (`limits.SharedRateLimiter`), so the rate holds across servers."""

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # "<limit>:<owner>"
    tokens: Mapped[float] = mapped_column(Float)
    at: Mapped[float] = mapped_column(Float)  # seconds since the epoch, by the database's clock


class SharedValue(Base):
    """A value every server on the database uses alike (the key the per-token webhook secrets derive from)."""

    __tablename__ = "shared_values"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(AnyText)


def open_engine(url: str) -> Engine:
    """The SQLAlchemy engine for a database URL: SQLite with WAL, or PostgreSQL through psycopg 3."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,  # a connection the database dropped (a restart, a failover) is replaced, not used
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        connect_args={"connect_timeout": 10, "application_name": "i2v"},
    )


def shown(url: str) -> str:
    """A database URL fit for a log line or an error: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured database"


class Store:
    """Thread-safe access to the database; returned rows are detached snapshots.

    `target`: a SQLite file, or a database URL (`sqlite:///...`, `postgresql+psycopg://...`)."""

    def __init__(self, target: Path | str) -> None:
        url = f"sqlite:///{target}" if isinstance(target, Path) else target
        self.engine = open_engine(url)
        self.shared = self.engine.dialect.name != "sqlite"  # other servers may use this database
        # This server's key on the rows it claims; `Peers` holds it as an advisory lock while we live.
        self.claimant = secrets.randbits(62) + 1
        try:
            before, now = migrations.upgrade(self.engine)
        except (OperationalError, InterfaceError) as exc:
            self.engine.dispose()
            raise StorageError(f"could not open the database {shown(url)}: {exc.orig}") from exc
        if before != now:
            log.info("database %s: schema upgraded from %s to %s", shown(url), before or "its first", now)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._create_lock = threading.Lock()  # this process's creates, before the database's own lock
        self._closed = threading.Event()
        self._outage_lock = threading.Lock()
        self._outage_since: float | None = None  # when background writes began to fail, while they do
        self.write_retries = 0  # background writes tried again because the database refused them

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except (OperationalError, InterfaceError) as exc:  # full, read-only, I/O, locked, unreachable
            raise StorageError(f"the database refused the write ({exc.orig})") from exc

    def close(self) -> None:
        self._closed.set()
        self.engine.dispose()

    def until_written(self, what: str, write: Callable[[], T]) -> T:
        """`write()`, retried with backoff while the database refuses it, until it lands (or the store
        closes, which re-raises). The first refusal is logged once; later ones are only counted."""
        delay = RETRY_FIRST_S
        while True:
            try:
                result = write()
            except StorageError as exc:
                with self._outage_lock:
                    first = self._outage_since is None
                    if first:
                        self._outage_since = time.monotonic()
                    self.write_retries += 1
                if first:
                    log.error("could not record %s: %s; retrying until it can (retries are counted in "
                              "i2v_store_write_retries_total)", what, exc)  # fmt: skip
                if self._closed.wait(delay):
                    raise
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            with self._outage_lock:
                since, self._outage_since = self._outage_since, None
            if since is not None:
                log.warning("the database takes writes again (%s recorded after %.1f s; %d retries so far)",
                            what, time.monotonic() - since, self.write_retries)  # fmt: skip
            return result

    # predictions

    def add(self, row: Base) -> None:
        with self.session() as s:
            s.add(row)

    def add_prediction(self, row: PredictionRow, max_unfinished: int = 0) -> bool:
        """Queue a prediction unless its owner already has `max_unfinished` waiting or running (0: no
        limit); False when the limit refused it. The count and the insert are one step for every server:
        on PostgreSQL an advisory lock per owner is held to the commit; on SQLite the insert comes first,
        taking the one write lock, so the count after it sees every other create (over the limit: undone)."""
        try:
            with self._create_lock, self.session() as s:
                if max_unfinished and self.shared:
                    s.execute(select(func.pg_advisory_xact_lock(LIMIT_LOCKS, _key32(row.owner))))
                s.add(row)
                s.flush()
                if max_unfinished and self._unfinished(s, row.owner) > max_unfinished:
                    raise _OverLimit
                self._announce(s, "queued", row.id)
        except _OverLimit:
            return False
        return True

    def prediction(self, prediction_id: str, owner: str | None = None) -> PredictionRow | None:
        """The prediction; with `owner`, only if that token's (another's reads as missing)."""
        query = select(PredictionRow).where(PredictionRow.id == prediction_id)
        if owner is not None:
            query = query.where(PredictionRow.owner == owner)
        with self.session() as s:
            return s.scalar(query)

    def count_unfinished(self, owner: str) -> int:
        with self.session() as s:
            return self._unfinished(s, owner)

    @staticmethod
    def _unfinished(s: Session, owner: str) -> int:
        return s.scalar(
            select(func.count())
            .select_from(PredictionRow)
            .where(PredictionRow.owner == owner, PredictionRow.status.in_(UNFINISHED))
        )

    def transition(
        self,
        prediction_id: str,
        expected: Collection[Status],
        held_by: int | None = None,
        **changes: Any,
    ) -> PredictionRow | None:
        """Compare-and-set: apply `changes` only if the status is still one of `expected` (and, with
        `held_by`, the prediction is still claimed by that server), in one UPDATE whose WHERE checks it;
        the row count decides. Returns the row as it now is, or None when the prediction had moved on (or
        does not exist). `changes` may be SQL expressions (`logs=PredictionRow.logs + line`), evaluated by
        the database. An end, a cancel request and a return to the queue are announced to other servers."""
        condition = [PredictionRow.id == prediction_id, PredictionRow.status.in_(list(expected))]
        if held_by is not None:
            condition.append(PredictionRow.claimed_by == held_by)
        with self.session() as s:
            done = s.execute(
                update(PredictionRow)
                .where(*condition)
                .values(**changes)
                .execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:
                return None
            status = changes.get("status")
            if status in TERMINAL:
                self._announce(s, "ended", prediction_id)
            elif status == QUEUED:
                self._announce(s, "queued", prediction_id)
            if changes.get("cancel_requested") is True:
                self._announce(s, "cancel", prediction_id)
            return s.scalar(select(PredictionRow).where(PredictionRow.id == prediction_id))

    def claim(self, prediction_id: str) -> PredictionRow | None:
        """Start a queued prediction on this server: it is `processing`, claimed by this store's `claimant`,
        one attempt more; None when it is no longer queued (canceled, or another server claimed it first).

        The claim is the one place servers compete for work. On PostgreSQL the row is read `FOR UPDATE SKIP
        LOCKED`, so a server never waits on another's claim of the same row (it moves on to the next); SQLite
        has one server and one writer at a time (`with_for_update` renders nothing there). Either way the
        UPDATE checks the status it read, so a cancel that commits in between wins."""
        with self.session() as s:
            locked = (
                select(PredictionRow.id)
                .where(PredictionRow.id == prediction_id, PredictionRow.status == QUEUED)
                .with_for_update(skip_locked=True)
            )
            if s.scalar(locked) is None:
                return None
            done = s.execute(
                update(PredictionRow)
                .where(PredictionRow.id == prediction_id, PredictionRow.status == QUEUED)
                .values(
                    status=RUNNING,
                    started_at=utcnow(),
                    attempts=PredictionRow.attempts + 1,
                    claimed_by=self.claimant,
                )
                .execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:
                return None
            return s.scalar(select(PredictionRow).where(PredictionRow.id == prediction_id))

    def _announce(self, s: Session, kind: str, prediction_id: str) -> None:
        """Tell the other servers on this database, when the transaction commits (NOTIFY is transactional)."""
        if self.shared:
            s.execute(select(func.pg_notify(CHANNEL, f"{self.claimant} {kind} {prediction_id}")))

    def append_log(self, prediction_id: str, line: str) -> PredictionRow | None:
        with self.session() as s:
            s.execute(
                update(PredictionRow)
                .where(PredictionRow.id == prediction_id, PredictionRow.status == RUNNING)
                .values(logs=PredictionRow.logs + line + "\n")
            )
            return s.scalar(select(PredictionRow).where(PredictionRow.id == prediction_id))

    def next_queued(self, mode: str | None = None) -> PredictionRow | None:
        """The oldest queued prediction (of `mode`, read from its stored input; absent means the default)."""
        query = select(PredictionRow).where(PredictionRow.status == QUEUED)
        if mode is not None:
            stored = func.coalesce(PredictionRow.input["mode"].as_string(), DEFAULT_MODE)
            query = query.where(stored == mode)
        with self.session() as s:
            return s.scalar(query.order_by(PredictionRow.seq).limit(1))

    def queued_ids(self) -> list[str]:
        """The predictions waiting for a worker, oldest first."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(PredictionRow.id).where(PredictionRow.status == QUEUED).order_by(PredictionRow.seq)
                )
            )

    def page(
        self,
        model: type[Base],
        *,
        after: int | None,
        before: int | None,
        limit: int,
        owner: str | None = None,
    ) -> tuple[list[Any], bool]:
        """Newest first. `after` = rows older than that seq, `before` = rows newer; returns (rows, more).

        With `owner`, only that token's rows."""
        seq = model.seq  # type: ignore[attr-defined]
        query = select(model)
        if owner is not None:
            query = query.where(model.owner == owner)  # type: ignore[attr-defined]
        if before is not None:
            query = query.where(seq > before).order_by(seq.asc())
        else:
            if after is not None:
                query = query.where(seq < after)
            query = query.order_by(seq.desc())
        with self.session() as s:
            rows = list(s.scalars(query.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        if before is not None:
            rows.reverse()
        return rows, more

    def exists_newer(self, model: type[Base], seq: int, owner: str | None = None) -> bool:
        return self._exists(model, model.seq > seq, owner)  # type: ignore[attr-defined]

    def exists_older(self, model: type[Base], seq: int, owner: str | None = None) -> bool:
        return self._exists(model, model.seq < seq, owner)  # type: ignore[attr-defined]

    def _exists(self, model: type[Base], condition: Any, owner: str | None) -> bool:
        query = select(func.count()).select_from(model).where(condition)
        if owner is not None:
            query = query.where(model.owner == owner)  # type: ignore[attr-defined]
        with self.session() as s:
            return s.scalar(query) > 0

    def recent(self, status: Status, limit: int) -> list[PredictionRow]:
        """The newest `limit` predictions with that status, every owner's (for time estimates)."""
        query = select(PredictionRow).where(PredictionRow.status == status)
        with self.session() as s:
            return list(s.scalars(query.order_by(PredictionRow.seq.desc()).limit(limit)))

    def counts_by_status(self) -> dict[Status, int]:
        with self.session() as s:
            rows = s.execute(select(PredictionRow.status, func.count()).group_by(PredictionRow.status)).all()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({status: n for status, n in rows})
        return counts

    def recover_interrupted(
        self, retry: bool, claimants: Collection[int | None] | None = None
    ) -> tuple[list[str], list[str]]:
        """Predictions left running by a server that is gone either run again (once, if `retry`) or fail:
        those claimed by `claimants` (servers `gone` found), or by default every one not claimed by this
        server (after a restart in SQLite mode, where this server is the only one).

        Returns (requeued ids, failed ids).
        """
        requeued, failed = [], []
        with self.session() as s:
            running = list(
                s.scalars(
                    select(PredictionRow).where(
                        PredictionRow.status == RUNNING, self._lost(PredictionRow.claimed_by, claimants)
                    )
                )
            )
        for row in running:
            if retry and row.attempts < 2:
                line = "the server restarted while this prediction ran; running it again\n"
                if self._transition_claim(
                    row, status=QUEUED, started_at=None, claimed_by=None, logs=PredictionRow.logs + line
                ):
                    requeued.append(row.id)
            elif self._transition_claim(
                row,
                status=FAILED,
                completed_at=utcnow(),
                error="the server stopped while this prediction was running; create it again",
            ):
                failed.append(row.id)
        return requeued, failed

    def _transition_claim(self, row: PredictionRow, **changes: Any) -> PredictionRow | None:
        """`transition` from running, only while the row is still claimed as it was read (NULL included)."""
        condition = [
            PredictionRow.id == row.id,
            PredictionRow.status == RUNNING,
            PredictionRow.claimed_by.is_(None)
            if row.claimed_by is None
            else PredictionRow.claimed_by == row.claimed_by,
        ]
        with self.session() as s:
            done = s.execute(
                update(PredictionRow)
                .where(*condition)
                .values(**changes)
                .execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:
                return None
            self._announce(s, "ended" if changes["status"] in TERMINAL else "queued", row.id)
            return s.scalar(select(PredictionRow).where(PredictionRow.id == row.id))

    def _lost(
        self, column: InstrumentedAttribute[int | None], claimants: Collection[int | None] | None
    ) -> Any:
        """The WHERE for claims of servers that are gone: `claimants`, or all but this server's."""
        if claimants is None:
            return or_(column.is_(None), column != self.claimant)
        keys = [k for k in claimants if k is not None]
        return or_(column.in_(keys), column.is_(None)) if None in claimants else column.in_(keys)

    def claimants(self) -> set[int | None]:
        """The servers holding a claim now: on running predictions and on pending webhook deliveries."""
        with self.session() as s:
            running = s.scalars(
                select(PredictionRow.claimed_by).where(PredictionRow.status == RUNNING).distinct()
            )
            sending = s.scalars(
                select(DeliveryRow.claimed_by).where(DeliveryRow.state == "pending").distinct()
            )
            return set(running) | set(sending)

    def gone(self, claimants: Collection[int | None]) -> set[int | None]:
        """Those of `claimants` whose server has stopped. A claim from before claims were recorded (NULL)
        is always; on SQLite, whose data dir one server holds, every key but this store's; on PostgreSQL,
        a key whose advisory lock no session holds (the database frees it when the server's connection
        ends, however the server ended)."""
        others = {k for k in claimants if k != self.claimant}
        if not self.shared:
            return others
        found: set[int | None] = {None} if None in others else set()
        with self.session() as s:
            for key in others - {None}:
                if s.scalar(select(func.pg_try_advisory_xact_lock(key))):  # free: nobody holds it
                    found.add(key)
        return found

    def cancels_requested_here(self) -> list[str]:
        """Predictions this server runs whose cancel was asked for (on any server)."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(PredictionRow.id).where(
                        PredictionRow.status == RUNNING,
                        PredictionRow.claimed_by == self.claimant,
                        PredictionRow.cancel_requested.is_(True),
                    )
                )
            )

    def unfinished_ids(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(PredictionRow.id).where(PredictionRow.status.in_(UNFINISHED))))

    def expired_predictions(self, before: datetime) -> list[PredictionRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(PredictionRow).where(
                        PredictionRow.completed_at < before, PredictionRow.data_removed.is_(False)
                    )
                )
            )

    # files

    def file(self, file_id: str, owner: str | None = None) -> FileRow | None:
        query = select(FileRow).where(FileRow.id == file_id)
        if owner is not None:
            query = query.where(FileRow.owner == owner)
        with self.session() as s:
            return s.scalar(query)

    def delete_file(self, file_id: str, owner: str | None = None) -> bool:
        query = select(FileRow).where(FileRow.id == file_id)
        if owner is not None:
            query = query.where(FileRow.owner == owner)
        with self.session() as s:
            row = s.scalar(query)
            if row is None:
                return False
            s.delete(row)
            return True

    def expired_files(self, now: datetime) -> list[FileRow]:
        with self.session() as s:
            return list(s.scalars(select(FileRow).where(FileRow.expires_at < now)))

    # webhook deliveries

    def adopt_deliveries(self, claimants: Collection[int | None] | None = None) -> list[DeliveryRow]:
        """Pending webhook deliveries of servers that are gone (`claimants`; by default all but this
        server's), now claimed by this one, oldest first. Rows another server is adopting at the same
        moment are skipped (`SKIP LOCKED`), so each delivery has one sender."""
        with self.session() as s:
            rows = list(
                s.scalars(
                    select(DeliveryRow)
                    .where(DeliveryRow.state == "pending", self._lost(DeliveryRow.claimed_by, claimants))
                    .order_by(DeliveryRow.seq)
                    .with_for_update(skip_locked=True)
                )
            )
            for row in rows:
                row.claimed_by = self.claimant
        return rows

    def holds_delivery(self, delivery_id: str) -> bool:
        """Whether the delivery is still pending and this server's to send (checked before each attempt)."""
        with self.session() as s:
            claimed = s.scalar(
                select(DeliveryRow.claimed_by).where(
                    DeliveryRow.id == delivery_id, DeliveryRow.state == "pending"
                )
            )
        return claimed == self.claimant

    def update_delivery(self, delivery_id: str, **changes: Any) -> None:
        with self.session() as s:
            s.execute(update(DeliveryRow).where(DeliveryRow.id == delivery_id).values(**changes))

    def deliveries_for(self, prediction_id: str) -> list[DeliveryRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(DeliveryRow)
                    .where(DeliveryRow.prediction_id == prediction_id)
                    .order_by(DeliveryRow.seq)
                )
            )

    # what every server shares

    def take_token(self, key: str, capacity: float, per_second: float) -> float:
        """Take one token from the bucket `key` (full at first, refilled at `per_second` by the database's
        clock, so servers' clocks never matter): 0.0 when taken, else the seconds until one is there.
        The bucket's row is locked from the read to the write, so servers taking at once count each take."""
        with self.session() as s:
            s.execute(self._insert_new(RateBucket).values(key=key, tokens=capacity, at=self._clock()))
            bucket = s.scalars(select(RateBucket).where(RateBucket.key == key).with_for_update()).one()
            now = s.scalar(select(self._clock()))
            tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.at) * per_second)
            granted = tokens >= 1
            bucket.tokens, bucket.at = tokens - 1 if granted else tokens, now
        return 0.0 if granted else (1 - tokens) / per_second

    def shared_value(self, name: str, make: Callable[[], str]) -> str:
        """The value stored under `name`; the first server to ask stores `make()`, and every server reads
        that one."""
        with self.session() as s:
            s.execute(self._insert_new(SharedValue).values(name=name, value=make()))
            return s.scalars(select(SharedValue.value).where(SharedValue.name == name)).one()

    def _insert_new(self, model: type[Base]) -> Insert:
        """INSERT that leaves an existing row alone (ON CONFLICT DO NOTHING, in each dialect's spelling)."""
        dialect = postgresql if self.shared else sqlite
        return dialect.insert(model).on_conflict_do_nothing()  # type: ignore[attr-defined,no-any-return]

    def _clock(self) -> ColumnElement[float]:
        """The database's clock in seconds since the epoch."""
        if self.shared:
            return func.date_part("epoch", func.clock_timestamp())
        return (func.julianday("now") - 2440587.5) * 86400.0


def _key32(text: str) -> int:
    """A stable signed 32-bit key for an advisory lock."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big", signed=True)


class DataDirLock:
    """An exclusive lock on the data dir (SQLite mode), held for the life of the process: a second server on
    the same folder would take the first's running predictions for interrupted ones. `flock` is released
    by the kernel when the process ends, however it ends."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "server.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"another i2v server (pid {holder}) is using the data dir {data_dir}; "
                "stop it first, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_shared_data_dir(store: Store, data_dir: Path) -> None:
    """Servers on one database run each other's predictions and serve each other's outputs, so they must
    use one data dir (a shared volume): its id, kept in a file in the data dir, must be the one the first
    server recorded in the database. `DataDirNotShared` otherwise, before anything goes wrong."""
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / "data_dir_id"
    if not marker.is_file():
        # write aside, then link into place: atomic, and the first of servers starting together wins
        draft = data_dir / f".data_dir_id.{os.getpid()}.{secrets.token_hex(4)}"
        draft.write_text(secrets.token_hex(16))
        try:
            os.link(draft, marker)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    mine = marker.read_text().strip()
    recorded = store.shared_value("data_dir_id", lambda: mine)
    if recorded != mine:
        raise DataDirNotShared(
            f"the database is used by servers with another data dir than {data_dir}: servers on one "
            "database must share one data dir (the same folder on a shared volume, I2V_DATA_DIR), since "
            "each runs and serves the others' predictions (docs/deploy.md)"
        )


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, fast in WAL mode
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
