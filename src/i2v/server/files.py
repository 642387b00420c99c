"""The Files API's storage: uploads streamed to disk with their checksums, resolved back for predictions."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

from .store import FileRow, StorageError, Store, utcnow

MAX_FILE_BYTES = 100 * 1024 * 1024
CHUNK = 1024 * 1024


_ID = re.compile(r"[a-z0-9]{1,40}")


class FileTooLarge(ValueError):
    pass


def new_id() -> str:
    """26 lowercase base32 characters, like Replicate's ids."""
    return base64.b32encode(secrets.token_bytes(16)).decode().lower().rstrip("=")


class Files:
    def __init__(self, store: Store, folder: Path, retention: float | None) -> None:
        self.store, self.folder, self.retention = store, folder, retention
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if not _ID.fullmatch(file_id):  # ids are ours; anything else never becomes a path
            raise ValueError(f"not a file id: {file_id!r}")
        return self.folder / file_id

    def save(
        self, stream: BinaryIO, name: str, content_type: str, metadata: dict[str, Any], owner: str = ""
    ) -> FileRow:
        file_id = new_id()
        sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
        partial = self.folder / f".{file_id}.part"
        try:
            with partial.open("wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        raise FileTooLarge(f"files are limited to {MAX_FILE_BYTES // 2**20} MB")
                    sha256.update(chunk)
                    md5.update(chunk)
                    out.write(chunk)
            partial.rename(self.path(file_id))
        except OSError as exc:  # full, read-only: the upload is refused (507), nothing is kept
            raise StorageError(f"the server could not store the file ({exc.strerror})") from None
        finally:
            with contextlib.suppress(OSError):  # else removed at the next start
                partial.unlink(missing_ok=True)
        now = utcnow()
        row = FileRow(
            id=file_id,
            name=name,
            content_type=content_type,
            size=size,
            sha256=sha256.hexdigest(),
            md5=md5.hexdigest(),
            meta=metadata,
            created_at=now,
            expires_at=now + timedelta(seconds=self.retention) if self.retention else None,
            owner=owner,
        )
        try:
            self.store.add(row)
        except StorageError:
            self.path(file_id).unlink(missing_ok=True)
            raise
        return row

    def delete(self, file_id: str, owner: str | None = None) -> bool:
        if not self.store.delete_file(file_id, owner):
            return False
        self.path(file_id).unlink(missing_ok=True)
        return True
