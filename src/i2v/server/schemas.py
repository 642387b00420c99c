"""The JSON shapes of Replicate's API: request bodies, predictions, files, pages and problem details."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..request import field_errors
from .states import Status, WebhookEvent
from .store import FileRow, PredictionRow


class CreatePrediction(BaseModel):
    """Body of POST /v1/predictions and /v1/models/{owner}/{name}/predictions; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any]
    version: str | None = None
    webhook: str | None = None
    webhook_events_filter: list[WebhookEvent] | None = None
    webhook_completed: str | None = None  # older clients' completion-only webhook
    stream: bool | None = None  # accepted for compatibility; outputs are files, nothing streams


class PredictionUrls(BaseModel):
    get: str
    cancel: str
    web: str  # the page showing this prediction, as Replicate links its own


class PredictionMetrics(BaseModel):
    predict_time: float | None = None
    total_time: float | None = None


class Prediction(BaseModel):
    id: str
    model: str
    version: str
    input: dict[str, Any]
    output: str | None
    logs: str
    error: str | None
    status: Status
    source: Literal["api"] = "api"
    data_removed: bool
    created_at: str
    started_at: str | None
    completed_at: str | None
    urls: PredictionUrls
    metrics: PredictionMetrics


class StageShare(BaseModel):
    name: str
    share: float  # of the whole predict time


class Estimate(BaseModel):
    """How long clips like this one took here: i2v's own, read-only; the web page shows it as it runs."""

    mode: str
    duration: int
    preset: str | None
    basis: Literal["same inputs", "same mode and duration", "none"]  # which finished clips it is from
    count: int
    predict_time: float | None  # median seconds, None without history
    stages: list[StageShare]  # in the order the engine runs them


class Page(BaseModel):
    next: str | None
    previous: str | None
    results: list[Any]


class FileObject(BaseModel):
    id: str
    name: str
    content_type: str
    size: int
    etag: str
    checksums: dict[str, str]
    metadata: dict[str, Any]
    created_at: str
    expires_at: str | None
    urls: dict[str, str]


class InvalidField(BaseModel):
    type: str
    field: str
    description: str


class Problem(BaseModel):
    """RFC 7807 problem details, as Replicate answers errors."""

    title: str
    detail: str
    status: int
    invalid_fields: list[InvalidField] | None = None


class APIError(Exception):
    """An error answered as a Replicate problem-details body."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        invalid_fields: list[InvalidField] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.problem = Problem(title=title, detail=detail, status=status, invalid_fields=invalid_fields)
        self.headers = headers or {}


def not_found(what: str) -> APIError:
    return APIError(404, "Not found", f"{what} was not found")


def invalid(title: str, fields: list[InvalidField]) -> APIError:
    detail = "\n".join(f"- {f.field}: {f.description}" for f in fields)
    return APIError(422, title, detail, fields)


_ERROR_TYPES = {
    "missing": "required",
    "literal_error": "enum",
    "enum": "enum",
    "extra_forbidden": "additional_property",
}


def invalid_fields(error: ValidationError, prefix: str = "") -> list[InvalidField]:
    """The fields a ValidationError names, as `input.<field>` (with `prefix="input."`), with their rules."""
    kinds = [item["type"] for item in error.errors(include_url=False)]
    return [
        InvalidField(
            type=_ERROR_TYPES.get(kind, kind),
            field=f"{prefix}{field}" if field != "input" else "input",
            description=rule,
        )
        for (field, rule), kind in zip(field_errors(error), kinds, strict=True)
    ]


def timestamp(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds") + "Z"


def prediction_body(
    row: PredictionRow, base: str, output_url: str | None, *, status: Status | None = None
) -> dict[str, Any]:
    """The prediction as the API shows it, with the output URL `links.OutputLinks` made for it; `status`
    overrides the stored one (see Prefer: wait)."""
    total = (row.completed_at - row.created_at).total_seconds() if row.completed_at else None
    url = f"{base}/v1/predictions/{row.id}"
    return Prediction(
        id=row.id,
        model=row.model,
        version=row.version,
        input=row.input,
        output=output_url if row.output and not row.data_removed else None,
        logs=row.logs,
        error=row.error,
        status=status or row.status,
        data_removed=row.data_removed,
        created_at=timestamp(row.created_at),  # type: ignore[arg-type]
        started_at=timestamp(row.started_at),
        completed_at=timestamp(row.completed_at),
        urls=PredictionUrls(get=url, cancel=f"{url}/cancel", web=f"{base}/?prediction={row.id}"),
        metrics=PredictionMetrics(predict_time=row.predict_time, total_time=total),
    ).model_dump()


def file_body(row: FileRow, base: str) -> dict[str, Any]:
    return FileObject(
        id=row.id,
        name=row.name,
        content_type=row.content_type,
        size=row.size,
        etag=f'"{row.md5}"',
        checksums={"sha256": row.sha256, "md5": row.md5},
        metadata=row.meta or {},
        created_at=timestamp(row.created_at),  # type: ignore[arg-type]
        expires_at=timestamp(row.expires_at),
        urls={"get": f"{base}/v1/files/{row.id}"},
    ).model_dump()
