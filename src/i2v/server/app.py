"""The HTTP routes: Replicate's prediction, model, files and webhook-secret API, plus health and metrics.

Routes only translate HTTP to `Service` calls and back; errors leave as Replicate's problem-details JSON.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from ..request import KlingRequest
from . import page_api, web
from .bodies import BodyGuard, parse_json, read_json
from .cog_schema import COG_VERSION, openapi_schema, version_id
from .config import ServerConfig
from .deps import BaseURL, Owner, ServiceDep, authenticate, authorize_metrics
from .files import FileTooLarge
from .links import SIGNED_ROUTE
from .responses import stored_response
from .runner import Runner
from .schemas import (
    APIError,
    CreatePrediction,
    InvalidField,
    file_body,
    invalid,
    invalid_fields,
    not_found,
    prediction_body,
)
from .service import Page, Service
from .states import TERMINAL
from .store import PredictionRow, StorageError, Store

log = logging.getLogger(__name__)

MAX_METADATA = 64 * 1024  # bytes of a file's metadata JSON
MAX_WAIT = 60
WAIT_MARGIN = 0.25  # answer a little before the client's read timeout (its wait + 0.5 s)
_WAIT = re.compile(r"^wait(?:\s*=\s*(\d+))?$")


def configured_runner(config: ServerConfig) -> Runner:
    """The runner `I2V_RUNNER` names; each is imported only when chosen (Ray is an optional extra)."""
    if config.runner == "ray":
        from .ray_runner import RayRunner

        return RayRunner.from_config(config)
    from .worker import LocalRunner

    return LocalRunner(config.model, config.devices, preload=config.preload_modes)


def create_app(config: ServerConfig, runner: Runner | None = None, store: Store | None = None) -> FastAPI:
    """The ASGI app; the service (and the worker processes) start with the app's lifespan. `store`: one
    opened already (`i2v serve` opens it first, so a database it cannot reach stops it with one line)."""
    service = Service(config, runner or configured_runner(config), store)
    version = version_id(config.model)
    started = datetime.now(UTC)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(
        title="i2v",
        description="Replicate-compatible image-to-video API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the token like everything but health and the page
    )
    app.state.service = service
    app.add_middleware(
        BodyGuard, max_body=config.max_body_bytes, timeout=config.body_timeout, budget=service.bodies
    )
    if config.trusted_hosts:  # outermost: a request for another host name is refused (400) before anything
        app.add_middleware(
            TrustedHostMiddleware, allowed_hosts=list(config.trusted_hosts), www_redirect=False
        )
    _install_error_handlers(app)
    authenticated = Depends(authenticate)

    # health stays open so load balancers can probe without a token; Prometheus sends its own for /metrics

    @app.get("/health-check")
    def health(service: ServiceDep) -> dict[str, Any]:
        return service.health()

    @app.get("/metrics", dependencies=[Depends(authorize_metrics)])
    def metrics(service: ServiceDep) -> Response:
        return Response(service.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", dependencies=[authenticated], include_in_schema=False)
    def openapi_document() -> dict[str, Any]:
        return app.openapi()

    api = APIRouter(prefix="/v1", dependencies=[authenticated])

    # models

    def version_body() -> dict[str, Any]:
        return {
            "id": version,
            "created_at": started.isoformat().replace("+00:00", "Z"),
            "cog_version": COG_VERSION,
            "openapi_schema": openapi_schema(),
        }

    def known_model(service: Service, owner: str, name: str) -> None:
        if not service.model_known(owner, name):
            raise not_found(f"model {owner}/{name}")

    @api.get("/models/{owner}/{name}")
    def get_model(owner: str, name: str, service: ServiceDep, base: BaseURL) -> dict[str, Any]:
        known_model(service, owner, name)
        return {
            "url": f"{base}/v1/models/{owner}/{name}",
            "owner": owner,
            "name": name,
            "description": "Image-to-video with Kling v2.1's inputs, on open-weight models served by i2v",
            "visibility": "public",
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "run_count": service.run_count(),
            "cover_image_url": None,
            "default_example": None,
            "latest_version": version_body(),
        }

    @api.get("/models/{owner}/{name}/versions")
    def list_versions(owner: str, name: str, service: ServiceDep) -> dict[str, Any]:
        known_model(service, owner, name)
        return {"next": None, "previous": None, "results": [version_body()]}

    @api.get("/models/{owner}/{name}/versions/{vid}")
    def get_version(owner: str, name: str, vid: str, service: ServiceDep) -> dict[str, Any]:
        known_model(service, owner, name)
        if vid != version:
            raise not_found(f"version {vid}")
        return version_body()

    # predictions

    # A create reads everything it can refuse (the body, Prefer) before storing anything, and after
    # storing does nothing that can fail: it is stored and answers 201, or is not stored.

    @api.post("/models/{owner}/{name}/predictions", status_code=201, openapi_extra=CREATE_BODY)
    async def create_for_model(
        owner: str, name: str, request: Request, service: ServiceDep, caller: Owner, base: BaseURL
    ) -> Response:
        known_model(service, owner, name)
        wait = _prefer_wait(request.headers.get("prefer"))
        body = await _body(request)
        row = await service.create(f"{owner}/{name}", version, body, base, caller)
        return await _created(service, row, wait, base)

    @api.post("/predictions", status_code=201, openapi_extra=CREATE_BODY)
    async def create_for_version(
        request: Request, service: ServiceDep, caller: Owner, base: BaseURL
    ) -> Response:
        wait = _prefer_wait(request.headers.get("prefer"))
        body = await _body(request)
        if not body.version:
            raise invalid(
                "Invalid request",
                [InvalidField(type="required", field="version", description="Field required")],
            )
        model = service.resolve_version(body.version, version)
        row = await service.create(model, version, body, base, caller)
        return await _created(service, row, wait, base)

    async def _created(service: Service, row: PredictionRow, wait: float | None, base: str) -> Response:
        headers = {"location": f"{base}/v1/predictions/{row.id}"}
        status = None
        if wait:
            headers["preference-applied"] = "wait"
            try:
                row = await service.wait(
                    row.id, max(0.5, wait - WAIT_MARGIN)
                )  # its creator's: no owner check
            except Exception:  # stored already: the answer is 201 with the row as created, whatever happens
                log.exception("waiting on %s failed", row.id)
            # The official client polls only when the answer says `starting`: anything else it takes as final.
            status = None if row.status in TERMINAL else "starting"
        body = prediction_body(row, base, service.output_url(row, base), status=status)
        return JSONResponse(body, status_code=201, headers=headers)

    @api.get("/predictions")
    def list_predictions(
        service: ServiceDep, caller: Owner, base: BaseURL, cursor: str | None = None
    ) -> dict[str, Any]:
        page = service.predictions(cursor, caller)
        return _page(
            page,
            f"{base}/v1/predictions",
            lambda row: prediction_body(row, base, service.output_url(row, base)),
        )

    @api.get("/predictions/{prediction_id}")
    def get_prediction(
        prediction_id: str, service: ServiceDep, caller: Owner, base: BaseURL
    ) -> dict[str, Any]:
        row = service.get(prediction_id, caller)
        return prediction_body(row, base, service.output_url(row, base))

    @api.post("/predictions/{prediction_id}/cancel")
    async def cancel_prediction(
        prediction_id: str, service: ServiceDep, caller: Owner, base: BaseURL
    ) -> dict[str, Any]:
        row = await asyncio.to_thread(service.cancel, prediction_id, caller)
        if row.status not in TERMINAL:  # give a running one a moment to stop at its next step
            row = await service.wait(prediction_id, 2.0)
        return prediction_body(row, base, service.output_url(row, base))

    @api.api_route("/predictions/{prediction_id}/output.mp4", methods=["GET", "HEAD"])
    def get_output(prediction_id: str, request: Request, service: ServiceDep, caller: Owner) -> Response:
        key = service.output(prediction_id, caller)
        return _output(request, service, key, f"output of prediction {prediction_id}")

    # files

    @api.post("/files", status_code=201, openapi_extra=UPLOAD_BODY)
    async def upload_file(
        request: Request, service: ServiceDep, caller: Owner, base: BaseURL
    ) -> dict[str, Any]:
        """Multipart: `content` (the file), optional `metadata` (JSON, as text or as a part: the JS client
        sends a Blob), `filename` and `type`."""
        try:
            form = await request.form()
        except OSError as exc:  # the spool file of a large upload could not be written
            raise StorageError(f"the server could not store the upload ({exc.strerror})") from None
        content = form.get("content")
        if not isinstance(content, StarletteUpload):
            raise invalid(
                "Invalid request", [InvalidField(type="required", field="content", description="no file")]
            )
        meta = await _form_json(form.get("metadata"))
        name = _form_text(form.get("filename")) or content.filename or "file"
        content_type = (
            _form_text(form.get("type"))
            or content.content_type
            or mimetypes.guess_type(name)[0]
            or "application/octet-stream"
        )
        try:
            row = await asyncio.to_thread(service.upload, content.file, name, content_type, meta, caller)
        except FileTooLarge as exc:
            raise APIError(413, "Payload too large", str(exc)) from None
        finally:
            await form.close()
        return file_body(row, base)

    @api.get("/files")
    def list_files(
        service: ServiceDep, caller: Owner, base: BaseURL, cursor: str | None = None
    ) -> dict[str, Any]:
        page = service.list_files(cursor, caller)
        return _page(page, f"{base}/v1/files", lambda row: file_body(row, base))

    @api.get("/files/{file_id}")
    def get_file(file_id: str, service: ServiceDep, caller: Owner, base: BaseURL) -> dict[str, Any]:
        return file_body(service.file(file_id, caller), base)

    @api.api_route("/files/{file_id}/download", methods=["GET", "HEAD"])
    def download_file(file_id: str, request: Request, service: ServiceDep, caller: Owner) -> Response:
        row = service.file(file_id, caller)
        try:
            return stored_response(
                request, service.storage, service.file_key(row), row.content_type, row.name
            )
        except FileNotFoundError:
            raise not_found(f"file {file_id}") from None

    @api.delete("/files/{file_id}", status_code=204)
    def delete_file(file_id: str, service: ServiceDep, caller: Owner) -> Response:
        service.delete_file(file_id, caller)
        return Response(status_code=204)

    # webhooks

    @api.get("/webhooks/default/secret")
    def webhook_secret(service: ServiceDep, caller: Owner) -> dict[str, str]:
        return {"key": service.webhook_secret(caller)}

    # account

    @api.get("/account")
    def account(service: ServiceDep, caller: Owner) -> dict[str, Any]:
        return service.account(caller)

    # outputs at signed links (I2V_OUTPUT_URLS=signed): no token, the signature is the credential

    @app.api_route(SIGNED_ROUTE + "/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    def signed_output(
        name: str,
        request: Request,
        service: ServiceDep,
        expires: str | None = None,
        signature: str | None = None,
    ) -> Response:
        key, left = service.signed_output(name, expires, signature)  # 403 saying why when it is not good
        headers = {
            # The link is the credential: any page may fetch it (as Replicate's outputs), none may cache
            # it past its expiry.
            "access-control-allow-origin": "*",
            "cache-control": f"private, max-age={left}",
        }
        return _output(request, service, key, f"output {name}", headers)

    app.include_router(api)
    app.include_router(page_api.router, prefix="/v1", dependencies=[authenticated])  # poster, estimate
    app.include_router(web.router)  # the page at /, open: it asks the API for a token itself
    return app


def _output(
    request: Request, service: Service, key: str, what: str, headers: dict[str, str] | None = None
) -> Response:
    try:
        return stored_response(
            request, service.storage, key, "video/mp4", key.rpartition("/")[2], "inline", headers
        )
    except FileNotFoundError:
        raise not_found(what) from None


async def _body(request: Request) -> CreatePrediction:
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise APIError(400, "Invalid request", 'the request body must be a JSON object like {"input": {...}}')
    try:
        return CreatePrediction.model_validate(raw)
    except ValidationError as exc:
        raise invalid("Invalid request", invalid_fields(exc)) from None


def _form_text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


async def _form_json(value: object) -> dict[str, Any]:
    text = (await value.read(MAX_METADATA + 1)) if isinstance(value, StarletteUpload) else value
    if not text:
        return {}
    if len(text) > MAX_METADATA:
        field = InvalidField(type="size", field="metadata", description=f"at most {MAX_METADATA // 1024} KiB")
        raise invalid("Invalid request", [field])
    try:
        meta = parse_json(text, "metadata", prefix="metadata.")  # type: ignore[arg-type]
    except APIError as exc:
        if exc.problem.status != 400:
            raise
        field = InvalidField(type="format", field="metadata", description=f"not JSON: {exc.problem.detail}")
        raise invalid("Invalid request", [field]) from None
    if not isinstance(meta, dict):
        field = InvalidField(type="type", field="metadata", description="must be a JSON object")
        raise invalid("Invalid request", [field])
    return meta


def _prefer_wait(header: str | None) -> float | None:
    """Seconds to hold the response for `Prefer: wait` (60) or `Prefer: wait=N` (1..60); None without it.
    Never raises: a preference the server cannot honour is ignored (RFC 7240), and any N over 60 is 60."""
    for part in (header or "").split(","):
        match = _WAIT.match(part.strip().lower())
        if match:
            digits = (match.group(1) or str(MAX_WAIT)).lstrip("0") or "0"
            return float(MAX_WAIT if len(digits) > 2 else min(MAX_WAIT, max(1, int(digits))))
    return None


def _page(page: Page[Any], url: str, render: Callable[[Any], Any]) -> dict[str, Any]:
    """A list page as Replicate shows it: `next`/`previous` are absolute URLs with an opaque cursor."""
    return {
        "next": f"{url}?cursor={page.next_cursor}" if page.next_cursor else None,
        "previous": f"{url}?cursor={page.previous_cursor}" if page.previous_cursor else None,
        "results": [render(row) for row in page.rows],
    }


def _install_error_handlers(app: FastAPI) -> None:
    def problem(
        status: int,
        title: str,
        detail: str,
        fields: list[InvalidField] | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        body = {"title": title, "detail": detail, "status": status}
        if fields is not None:
            body["invalid_fields"] = [f.model_dump() for f in fields]
        headers = {"www-authenticate": "Bearer"} if status == 401 else {}
        return JSONResponse(body, status_code=status, headers={**headers, **(extra_headers or {})})

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        p = exc.problem
        return problem(p.status, p.title, p.detail, p.invalid_fields, exc.headers)

    @app.exception_handler(StorageError)
    async def storage_error(_request: Request, exc: StorageError) -> JSONResponse:
        log.error("%s", exc)
        return problem(507, "Insufficient storage", f"{exc}; nothing was changed")

    @app.exception_handler(ClientDisconnect)
    async def gone(_request: Request, _exc: ClientDisconnect) -> Response:
        return Response(status_code=400)  # nobody reads it: the client left before sending its body

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Request failed")
        return problem(exc.status_code, title, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def request_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            InvalidField(
                type=e["type"],
                field=".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]),
                description=e["msg"],
            )
            for e in exc.errors()
        ]
        return problem(
            422, "Invalid request", "\n".join(f"- {f.field}: {f.description}" for f in fields), fields
        )

    @app.exception_handler(Exception)
    async def crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(500, "Internal server error", "the server hit an unexpected error; it has been logged")


def _create_schema() -> dict[str, Any]:
    schema = CreatePrediction.model_json_schema()
    schema["properties"]["input"] = KlingRequest.model_json_schema()
    return schema


# The create and upload routes read their bodies themselves (for Replicate's error shapes); these describe
# the bodies in /openapi.json, for clients and for the schema-driven fuzzing in the tests.
CREATE_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _create_schema()}}}
}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["content"],
                    "properties": {
                        "content": {"type": "string", "format": "binary"},
                        "filename": {"type": "string"},
                        "type": {"type": "string"},
                        "metadata": {"type": "string", "description": "a JSON object"},
                    },
                }
            }
        },
    }
}
