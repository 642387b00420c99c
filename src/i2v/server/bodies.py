"""Request bodies in: how big (413), how slow (408), how much memory all of them may hold (429), and JSON
that can be stored and served back.

JSON as Python reads it takes more than JSON can carry back out: `NaN` and `Infinity` (and `1e400`, which
becomes infinity), lone UTF-16 surrogates (`"\\udfff"`, which no UTF-8 answer can hold) and nesting deep
enough to exhaust a recursion limit somewhere later. `parse_json` refuses each of them with a 4xx that names
the field, so whatever is accepted is stored, read back and listed like anything else.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .schemas import APIError, InvalidField, invalid

MAX_DEPTH = 32  # far more than any request needs: {"input": {...}} is 2
FILES_PREFIX = "/v1/files"


def parse_json(raw: bytes | str, what: str = "the request body", prefix: str = "") -> Any:
    """Parse JSON, refusing what could not be stored and served back: 400 for what is not JSON at all,
    422 naming the field (`{prefix}a.b`) for non-finite numbers, lone surrogates and nesting over
    MAX_DEPTH."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise APIError(
            400, "Invalid request", f"{what} is nested too deeply (at most {MAX_DEPTH} levels)"
        ) from None
    except ValueError as exc:  # JSONDecodeError, invalid UTF-8, an integer of thousands of digits
        raise APIError(400, "Invalid request", f"{what} is not valid JSON ({exc})") from None
    problem = _unservable(value)
    if problem is not None:
        path, rule = problem
        field = ".".join(path) if path else what
        raise invalid(
            "Invalid request", [InvalidField(type="format", field=prefix + field, description=rule)]
        )
    return value


def _unservable(value: Any) -> tuple[list[str], str] | None:
    """The first place in a parsed JSON value that could not be written back out, with the reason."""
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            return path[:MAX_DEPTH], f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, str):
            if not _is_text(item):
                return path, "has a lone UTF-16 surrogate, which is not text (UTF-8 cannot carry it)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return path, "numbers must be finite (NaN and Infinity are not JSON)"
        elif isinstance(item, dict):
            for key, child in item.items():
                where = [*path, _printable(key)]
                if not _is_text(key):
                    return where, "a key has a lone UTF-16 surrogate, which is not text"
                stack.append((child, where))
        elif isinstance(item, list):
            stack.extend((child, [*path, str(n)]) for n, child in enumerate(item))
    return None


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(key: str) -> str:
    shown = key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return shown if len(shown) <= 60 else shown[:57] + "..."


async def read_json(request: Request) -> Any:
    """The request's body as JSON (`null` when empty), parsed by `parse_json`."""
    return parse_json(await request.body() or b"null")


class BodyBudget:
    """Bytes of request bodies held in memory now, over all requests; readable by the metrics."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.limit and self.held + n > self.limit:
                return False
            self.held += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.held -= n


class BodyGuard:
    """ASGI middleware for request bodies, as they arrive:

    - size: over the limit is 413 (the Files API's for uploads, `max_body` for the rest); a declared
      Content-Length is refused before any byte is read, a chunked body when it passes the limit;
    - time: the whole body must arrive within `timeout` seconds of the first read, however slowly it
      trickles, else 408 (a stalled client holds neither memory nor a connection for long);
    - memory: bodies read into memory (all but uploads, which are spooled to disk) share `budget`; one
      that would take it over is refused with 429 and Retry-After, before it is read.
    """

    def __init__(self, app: ASGIApp, max_body: int, timeout: float, budget: BodyBudget) -> None:
        self.app, self.max_body, self.timeout, self.budget = app, max_body, timeout, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from .files import MAX_FILE_BYTES

        upload = scope["path"].rstrip("/").endswith(FILES_PREFIX)
        if upload:
            limit, what = MAX_FILE_BYTES + 2**20, f"files are limited to {MAX_FILE_BYTES // 2**20} MB"
        else:
            limit, what = self.max_body or 0, f"request bodies are limited to {_size(self.max_body)}"
        length = dict(scope["headers"]).get(b"content-length", b"")
        declared = int(length) if length.isdigit() and len(length) < 20 else None
        if limit and declared is not None and declared > limit:
            body = {"title": "Payload too large", "detail": what, "status": 413}
            await _answer(scope, receive, send, 413, body)
            return
        loop = asyncio.get_running_loop()
        state = {"seen": 0, "held": 0, "deadline": 0.0, "done": False}

        def hold(n: int) -> None:
            if upload or n <= state["held"]:
                return
            if not self.budget.take(n - state["held"]):
                raise APIError(
                    429,
                    "Too many requests",
                    "the server is receiving too much request data at once; try again in a few seconds",
                    headers={"retry-after": "2"},
                )
            state["held"] = n

        async def guarded() -> Message:
            if state["done"]:  # the body is in: later reads wait for a disconnect, with no deadline
                return await receive()
            if not state["deadline"]:
                state["deadline"] = loop.time() + self.timeout
                hold(declared or 0)
            try:
                async with asyncio.timeout_at(state["deadline"]):
                    message = await receive()
            except TimeoutError:
                raise APIError(
                    408,
                    "Request timeout",
                    f"the request body did not arrive within {self.timeout:g} s (I2V_BODY_TIMEOUT)",
                    headers={"connection": "close"},
                ) from None
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if limit and state["seen"] > limit:
                    raise APIError(413, "Payload too large", what)
                hold(state["seen"])
                state["done"] = not message.get("more_body", False)
            else:
                state["done"] = True
            return message

        try:
            await self.app(scope, guarded, send)
        finally:
            if state["held"]:
                self.budget.give_back(state["held"])


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, body: dict[str, Any]) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status)(scope, receive, send)


def _size(n: int) -> str:
    return f"{n // 2**20} MB" if n >= 2**20 else f"{n} bytes"
