"""The durable store: predictions, uploaded files and webhook deliveries in SQLite (WAL) under the data dir.

Rows carry an integer `seq` in creation order: it gives FIFO order to the queue and stable cursors to lists.
Every method opens its own short transaction, so the store is safe to share between threads.

Every status change is a compare-and-set: one `UPDATE ... WHERE id = ? AND status IN (expected)` whose row
count says whether it happened, in portable SQLAlchemy Core (the same statement serves PostgreSQL). Whoever
wins ends the prediction; a late or racing writer (a worker's outcome after a cancel) changes nothing.

A write the database refuses (disk full, read-only, I/O error) is a `StorageError`. The HTTP side answers
it with 507; background writes that must land (a worker's outcome, a webhook's record) go through
`until_written`, which retries them, saying so once and counting the retries.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..errors import I2VError
from ..request import KlingRequest
from .states import FAILED, QUEUED, RUNNING, STATUSES, UNFINISHED, Status

DEFAULT_MODE: str = KlingRequest.model_fields["mode"].default
log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 2.0  # backoff of `until_written`


class StorageError(I2VError, OSError):
    """The data dir or the database refused a write (full, read-only, failing); the HTTP side answers 507."""


class DataDirInUse(I2VError):
    """Another server holds the data dir's lock."""


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every stored time is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


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
    logs: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    predict_time: Mapped[float | None] = mapped_column(Float, default=None)
    data_removed: Mapped[bool] = mapped_column(Boolean, default=False)
    webhook: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_events_filter: Mapped[list[str]] = mapped_column(JSON, default=list)
    base_url: Mapped[str] = mapped_column(String(300))  # the origin the client used; for URLs in webhooks
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    owner: Mapped[str] = mapped_column(String(64), default="", index=True)  # limits.token_owner of its token


class FileRow(Base):
    __tablename__ = "files"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(300))
    content_type: Mapped[str] = mapped_column(String(200))
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
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(16))
    terminal: Mapped[bool] = mapped_column(Boolean)
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str] = mapped_column(String(64), default="")  # whose secret signs it
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Store:
    """Thread-safe access to the database; returned rows are detached snapshots."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(
            f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._add_missing_columns()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._closed = threading.Event()
        self._outage_lock = threading.Lock()
        self._outage_since: float | None = None  # when background writes began to fail, while they do
        self.write_retries = 0  # background writes tried again because the database refused them

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:  # full, read-only, I/O error, locked: the write did not happen
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

    def _add_missing_columns(self) -> None:
        """Bring a database made by an older version up to date (new columns only, with their defaults)."""
        with self.engine.begin() as conn:
            for table in (PredictionRow.__table__, FileRow.__table__, DeliveryRow.__table__):
                present = {c["name"] for c in inspect(conn).get_columns(table.name)}
                if "owner" not in present:
                    conn.execute(
                        text(f"ALTER TABLE {table.name} ADD COLUMN owner VARCHAR(64) NOT NULL DEFAULT ''")
                    )

    # predictions

    def add(self, row: Base) -> None:
        with self.session() as s:
            s.add(row)

    def prediction(self, prediction_id: str, owner: str | None = None) -> PredictionRow | None:
        """The prediction; with `owner`, only if that token's (another's reads as missing)."""
        query = select(PredictionRow).where(PredictionRow.id == prediction_id)
        if owner is not None:
            query = query.where(PredictionRow.owner == owner)
        with self.session() as s:
            return s.scalar(query)

    def count_unfinished(self, owner: str) -> int:
        with self.session() as s:
            return s.scalar(
                select(func.count())
                .select_from(PredictionRow)
                .where(PredictionRow.owner == owner, PredictionRow.status.in_(UNFINISHED))
            )

    def transition(
        self, prediction_id: str, expected: Collection[Status], **changes: Any
    ) -> PredictionRow | None:
        """Compare-and-set: apply `changes` only if the status is still one of `expected`, in one UPDATE
        whose WHERE checks it; the row count decides. Returns the row as it now is, or None when the
        prediction had moved on (or does not exist). `changes` may be SQL expressions
        (`logs=PredictionRow.logs + line`), evaluated by the database."""
        with self.session() as s:
            done = s.execute(
                update(PredictionRow)
                .where(PredictionRow.id == prediction_id, PredictionRow.status.in_(list(expected)))
                .values(**changes)
                .execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:
                return None
            return s.scalar(select(PredictionRow).where(PredictionRow.id == prediction_id))

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

    def recover_interrupted(self, retry: bool) -> tuple[list[str], list[str]]:
        """After a restart: predictions left running either run again (once, if `retry`) or fail.

        Returns (requeued ids, failed ids).
        """
        requeued, failed = [], []
        with self.session() as s:
            running = list(s.scalars(select(PredictionRow).where(PredictionRow.status == RUNNING)))
        for row in running:
            if retry and row.attempts < 2:
                line = "the server restarted while this prediction ran; running it again\n"
                if self.transition(
                    row.id, {RUNNING}, status=QUEUED, started_at=None, logs=PredictionRow.logs + line
                ):
                    requeued.append(row.id)
            elif self.transition(
                row.id,
                {RUNNING},
                status=FAILED,
                completed_at=utcnow(),
                error="the server stopped while this prediction was running; create it again",
            ):
                failed.append(row.id)
        return requeued, failed

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

    def pending_deliveries(self) -> list[DeliveryRow]:
        with self.session() as s:
            return list(
                s.scalars(select(DeliveryRow).where(DeliveryRow.state == "pending").order_by(DeliveryRow.seq))
            )

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


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, fast in WAL mode
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
