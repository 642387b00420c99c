"""Stored files going out (the mp4s, Files API downloads): HEAD, validators and ranges as RFC 9110 has them.

- `If-None-Match` matching the file's ETag (weak comparison, `*` included) answers 304 with no body;
- a Range in a unit other than bytes is ignored (the whole file, 200), as RFC 9110 14.2 requires; a bytes
  range that is invalid (`bytes=500-100`: the last position before the first) or unsatisfiable answers
  416 with `Content-Range: bytes */size`, where Starlette would answer 400;
- HEAD answers the GET's headers without the body (Starlette's FileResponse does that for HEAD).

A stored object that is a local file goes out as one (sendfile); one in a bucket streams through with the
same rules, asking the bucket for just the range wanted (several ranges: the whole object, which RFC 9110
allows).
"""

from __future__ import annotations

import os
from email.utils import formatdate
from pathlib import Path
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    MalformedRangeHeader,
    RangeNotSatisfiable,
    Response,
    StreamingResponse,
)

from .storage import Storage


class StoredFile(FileResponse):
    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        unit, sep, _ = http_range.partition("=")
        if not sep or unit.strip().lower() != "bytes":
            return []  # not a bytes range: ignored, the whole file goes out
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            raise RangeNotSatisfiable(file_size) from None


def file_response(
    request: Request,
    path: Path,
    media_type: str,
    filename: str,
    content_disposition_type: str = "attachment",
) -> Response:
    """The file at `path`, or 304 when the client's `If-None-Match` already names this version of it."""
    stat = os.stat(path)
    response = StoredFile(
        path,
        media_type=media_type,
        filename=filename,
        stat_result=stat,
        content_disposition_type=content_disposition_type,
    )
    if _matches(request.headers.get("if-none-match"), response.headers["etag"]):
        kept = {k: response.headers[k] for k in ("etag", "last-modified") if k in response.headers}
        return Response(status_code=304, headers=kept)
    return response


def stored_response(
    request: Request,
    storage: Storage,
    key: str,
    media_type: str,
    filename: str,
    content_disposition_type: str = "attachment",
    headers: dict[str, str] | None = None,
) -> Response:
    """The object stored under `key` (FileNotFoundError when there is none), with `headers` added."""
    path = storage.local_path(key)
    if path is not None:
        response = file_response(request, path, media_type, filename, content_disposition_type)
        response.headers.update(headers or {})
        return response
    info = storage.stat(key)
    if info is None:
        raise FileNotFoundError(key)
    sent = {
        **(headers or {}),
        "etag": info.etag,
        "last-modified": formatdate(info.modified.timestamp(), usegmt=True),
        "accept-ranges": "bytes",
        "content-disposition": _disposition(content_disposition_type, filename),
    }
    if _matches(request.headers.get("if-none-match"), info.etag):
        return Response(status_code=304, headers={k: sent[k] for k in ("etag", "last-modified")})
    ranges: list[tuple[int, int]] = []
    http_range, if_range = request.headers.get("range"), request.headers.get("if-range")
    if http_range and (if_range is None or if_range in (info.etag, sent["last-modified"])):
        try:
            ranges = StoredFile._parse_range_header(http_range, info.size)
        except RangeNotSatisfiable:
            return Response(status_code=416, headers={**sent, "content-range": f"bytes */{info.size}"})
    status, (start, end) = 200, (0, info.size)
    if len(ranges) == 1:
        status, (start, end) = 206, ranges[0]
        sent["content-range"] = f"bytes {start}-{end - 1}/{info.size}"
    sent["content-length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=sent, media_type=media_type)
    chunks = storage.read_range(key, start, end) if end > start else iter(())
    return StreamingResponse(chunks, status_code=status, headers=sent, media_type=media_type)


def _disposition(kind: str, filename: str) -> str:
    quoted = quote(filename)
    return f"{kind}; filename*=utf-8''{quoted}" if quoted != filename else f'{kind}; filename="{filename}"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags
