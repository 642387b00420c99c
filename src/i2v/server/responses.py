"""Stored files going out (the mp4s, Files API downloads): HEAD, validators and ranges as RFC 9110 has them.

- `If-None-Match` matching the file's ETag (weak comparison, `*` included) answers 304 with no body;
- a Range in a unit other than bytes is ignored (the whole file, 200), as RFC 9110 14.2 requires; a bytes
  range that is invalid (`bytes=500-100`: the last position before the first) or unsatisfiable answers
  416 with `Content-Range: bytes */size`, where Starlette would answer 400;
- HEAD answers the GET's headers without the body (Starlette's FileResponse does that for HEAD).
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable, Response


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


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags
