"""The durable store: predictions, uploaded files and webhook deliveries in SQLite (WAL) under the data dir.

Rows carry an integer `seq` in creation order: it gives FIFO order to the queue and stable cursors to lists.
Every method opens its own short transaction, so the store is safe to share between threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..request import KlingRequest
from .states import FAILED, QUEUED, RUNNING, STATUSES, UNFINISHED, Status

DEFAULT_MODE: str = KlingRequest.model_fields["mode"].default


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

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def _add_missing_columns(self) -> None:
        """Bring a database made by an older version up to date (new columns only, with their defaults)."""
        with self.engine.begin() as conn:
            for table in (PredictionRow.__table__, FileRow.__table__):
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
        self, prediction_id: str, allowed: frozenset[str] | set[str], **changes: Any
    ) -> PredictionRow | None:
        """Apply `changes` only if the prediction's status is in `allowed`; returns the new row, or None."""
        with self.session() as s:
            row = s.scalar(
                select(PredictionRow).where(
                    PredictionRow.id == prediction_id, PredictionRow.status.in_(allowed)
                )
            )
            if row is None:
                return None
            for key, value in changes.items():
                setattr(row, key, value)
            return row

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
            for row in s.scalars(select(PredictionRow).where(PredictionRow.status == RUNNING)):
                if retry and row.attempts < 2:
                    row.status, row.started_at = QUEUED, None
                    row.logs += "the server restarted while this prediction ran; running it again\n"
                    requeued.append(row.id)
                else:
                    row.status, row.completed_at = FAILED, utcnow()
                    row.error = "the server stopped while this prediction was running; create it again"
                    failed.append(row.id)
        return requeued, failed

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


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, fast in WAL mode
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
