"""What a create must pass before anything is queued: the request model, the webhook URL, the images.

Images are fetched (URLs through the SSRF guard), read (uploaded files: only the caller's own) or decoded
(data URIs) here, once, and checked as the engine will check them, so a bad image is a 4xx at create: 413
for one over the size limit (`ImageTooLarge`), else 422 naming `input.<field>`. The checked bytes go with
the job to the worker, which fetches nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import ValidationError

from ..errors import ImageTooLarge, InputError
from ..images import FETCH_TIMEOUT, ImageLoader, Pinned, decode_image, too_large
from ..images import MAX_BYTES as MAX_IMAGE_BYTES
from ..request import IMAGE_FIELDS, ImageField, KlingRequest
from .config import ServerConfig
from .files import Files
from .schemas import APIError, CreatePrediction, InvalidField, invalid, invalid_fields
from .states import WEBHOOK_EVENTS, WebhookEvent
from .store import Store

_OWN_FILE = re.compile(r"^/v1/files/(?P<id>[a-z0-9]+)(?:/download)?/?$")


@dataclass(frozen=True)
class Checked:
    """A create's body once checked: the request and its webhook (the images are read after the limits).

    Input keys the model does not take are dropped, as Cog's runtime strips them before `predict()`: only
    the checked request is stored, and `ignored` names what was left out (in the prediction's logs)."""

    request: KlingRequest
    webhook: str | None
    events: list[WebhookEvent]
    ignored: list[str]


class Intake:
    def __init__(self, config: ServerConfig, store: Store, files: Files) -> None:
        self.config, self.store, self.files = config, store, files
        # Image URLs are fetched here, at create, with the SSRF guard; the worker gets the checked bytes.
        self.loader = ImageLoader(
            allow_local_paths=False, allow=config.fetch_allow, timeout=config.fetch_timeout or FETCH_TIMEOUT
        )

    def check(self, body: CreatePrediction) -> Checked:
        """The request model (422 naming `input.<field>`) and the webhook (422 naming `webhook`)."""
        try:
            request = KlingRequest.model_validate(body.input)
        except ValidationError as exc:
            raise invalid("Input validation failed", invalid_fields(exc, "input.")) from None
        webhook = body.webhook or body.webhook_completed
        events = list(body.webhook_events_filter or (WEBHOOK_EVENTS if body.webhook else ["completed"]))
        if webhook:
            self._check_webhook(webhook)
        unknown = [key for key in body.input if key not in KlingRequest.model_fields]
        ignored = [key if len(key) <= 40 else key[:37] + "..." for key in unknown[:10]]
        if len(unknown) > 10:
            ignored.append(f"and {len(unknown) - 10} more")
        return Checked(request=request, webhook=webhook, events=events, ignored=ignored)

    def pin_webhook(self, url: str) -> Pinned:
        """The SSRF rules image URLs follow, for a webhook receiver (checked again at each delivery)."""
        return self.loader.pin(url, "webhook")

    def _check_webhook(self, url: str) -> None:
        problem = None
        if urlsplit(url).scheme not in ("http", "https"):
            problem = "must be an http(s) URL"
        else:
            try:
                self.pin_webhook(url)
            except InputError as exc:
                problem = exc.rule
        if problem:
            raise invalid(
                "Invalid request", [InvalidField(type="format", field="webhook", description=problem)]
            )

    def images(self, request: KlingRequest, base: str, owner: str) -> dict[ImageField, bytes]:
        """Each image input's bytes, fetched (or read) and decoded once here. Too large: 413; else 422."""
        problems, images, too_big = [], {}, False
        for field in IMAGE_FIELDS:
            value = getattr(request, field)
            if value is None:
                continue
            try:
                data = self._image_bytes(value, field, base, owner)
                decode_image(data, field)
            except InputError as exc:
                too_big |= isinstance(exc, ImageTooLarge)
                problems.append(InvalidField(type="image", field=f"input.{field}", description=exc.rule))
            else:
                images[field] = data
        if problems:
            if too_big:
                raise APIError(
                    413,
                    "Payload too large",
                    "\n".join(f"- {p.field}: {p.description}" for p in problems),
                    invalid_fields=problems,
                )
            raise invalid("Input validation failed", problems)
        return images

    def _image_bytes(self, value: str, field: ImageField, base: str, owner: str) -> bytes:
        file_id = self.own_file_id(value, (base,))
        if file_id is None:
            if urlsplit(value).scheme.lower() not in ("http", "https", "data"):
                raise InputError(field, "must be an http(s) URL, a data URI or an uploaded file's URL")
            return self.loader.read_bytes(value, field)
        stored = self.store.file(file_id, owner)
        if stored is None:
            raise InputError(field, f"uploaded file {file_id} does not exist (deleted or expired)")
        if stored.size > MAX_IMAGE_BYTES:
            raise too_large(field)
        try:
            return self.files.read(file_id)  # a storage that cannot be reached: StorageError, 507
        except FileNotFoundError:
            raise InputError(field, f"uploaded file {file_id} does not exist (deleted or expired)") from None

    def own_file_id(self, url: str, bases: tuple[str, ...]) -> str | None:
        """The file id when `url` is one of our Files API URLs (read from the storage, not over HTTP)."""
        for base in {*bases, self.config.public_url}:
            if base and url.startswith(base + "/"):
                match = _OWN_FILE.match(url[len(base) :].split("?", 1)[0])
                if match:
                    return match.group("id")
        return None
