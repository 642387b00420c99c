"""The Files API: uploads streamed to a staged file with their checksums, then put into the storage (the
data folder or a bucket); read back for predictions, deleted with their rows."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import secrets
from datetime import timedelta
from typing import Any, BinaryIO

from .storage import Storage, file_key, staged
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
    def __init__(self, store: Store, storage: Storage, retention: float | None) -> None:
        self.store, self.storage, self.retention = store, storage, retention

    @staticmethod
    def key(file_id: str) -> str:
        if not _ID.fullmatch(file_id):  # ids are ours; anything else never becomes a key
            raise ValueError(f"not a file id: {file_id!r}")
        return file_key(file_id)

    def read(self, file_id: str) -> bytes:
        return self.storage.read(self.key(file_id))

    def save(
        self, stream: BinaryIO, name: str, content_type: str, metadata: dict[str, Any], owner: str = ""
    ) -> FileRow:
        file_id = new_id()
        sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
        with staged(self.storage, file_id) as partial:
            try:
                with partial.open("wb") as out:
                    while chunk := stream.read(CHUNK):
                        size += len(chunk)
                        if size > MAX_FILE_BYTES:
                            raise FileTooLarge(f"files are limited to {MAX_FILE_BYTES // 2**20} MB")
                        sha256.update(chunk)
                        md5.update(chunk)
                        out.write(chunk)
            except OSError as exc:  # full, read-only: the upload is refused (507), nothing is kept
                raise StorageError(f"the server could not store the file ({exc.strerror})") from None
            self.storage.put_file(self.key(file_id), partial, content_type)
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
            with contextlib.suppress(OSError):
                self.storage.delete(self.key(file_id))
            raise
        return row

    def delete(self, file_id: str, owner: str | None = None) -> bool:
        """The bytes go first, then the row: a storage that refuses (StorageError) leaves the file as it was,
        for the retention sweep to try again, never an object that no row names."""
        if self.store.file(file_id, owner) is None:
            return False
        self.storage.delete(self.key(file_id))
        return self.store.delete_file(file_id, owner)
