"""Where the service keeps bytes: uploads (Files API), prediction inputs and outputs, behind one small seam.

`LocalStorage` keeps them as files under the data folder, where they always were (`files/`, `inputs/`,
`outputs/`); `S3Storage` keeps them as objects in a bucket (`I2V_STORAGE_URL=s3://bucket/prefix`, any
S3-compatible endpoint through `I2V_S3_ENDPOINT_URL`), through boto3 and its own credential chain. Keys are
the same for both and are made here only (`output_key`, `poster_key`, `input_key`, `file_key`).

The seam takes bytes or a local file and shares no disk with anyone: a storage pickles as its settings (the
S3 client is made again in each process), so a worker process, or a worker on another machine, opens the
same storage and puts its mp4 there itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from .store import StorageError

if TYPE_CHECKING:
    from ..request import ImageField

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
PRESIGN_MAX_S = 7 * 24 * 3600  # SigV4's limit for a presigned URL
_KEY = re.compile(r"(files|inputs|outputs)/[a-z0-9][a-z0-9_-]{0,80}(\.[a-z0-9_]{1,16})?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def output_key(prediction_id: str) -> str:
    """A prediction's mp4."""
    return f"outputs/{prediction_id}.mp4"


def poster_key(prediction_id: str) -> str:
    """A prediction's poster frame (JPEG), stored with its mp4 by the worker."""
    return f"outputs/{prediction_id}.jpg"


def input_key(prediction_id: str, field: ImageField) -> str:
    """An image input's bytes, as checked at create, until the prediction ends."""
    return f"inputs/{prediction_id}.{field}"


def file_key(file_id: str) -> str:
    """An upload of the Files API."""
    return f"files/{file_id}"


def check_key(key: str) -> str:
    """Keys are made above from our own ids; anything else (a path, `..`) never reaches a storage."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a storage key: {key!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str  # quoted, as HTTP sends it
    modified: datetime  # UTC


class Storage(Protocol):
    """The few things the service does with stored bytes. A missing object raises FileNotFoundError; a
    storage that refuses or cannot be reached raises StorageError (an OSError too), naming where and why."""

    def check(self) -> None:
        """Fail at start-up, with what to fix, when the storage cannot be used."""

    def describe(self) -> str:
        """Where the bytes go, for the log and error messages."""

    def staging_dir(self) -> Path | None:
        """Where a file about to be put is best written (the same file system: the put is a rename); None:
        the system's temporary folder."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        """Store the local file at `path` under `key`; the file is gone afterwards (moved or uploaded)."""

    def read(self, key: str) -> bytes: ...

    def read_range(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        """The bytes from `start` to `end` (exclusive; None: to the end), in chunks."""

    def stat(self, key: str) -> ObjectInfo | None: ...

    def delete(self, key: str) -> None:
        """Delete the object; a missing one is not an error."""

    def keys(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """The keys under `prefix` (`inputs/`) with their modification times."""

    def local_path(self, key: str) -> Path | None:
        """The object's file when it is one on this machine (served with sendfile), else None."""

    def presigned_url(self, key: str, expires_in: int) -> str | None:
        """A URL the storage itself serves the object at, with no other credential, for `expires_in`
        seconds (S3), or None."""

    def sweep(self, min_age: float) -> int:
        """Remove what a killed process left half-written, untouched for `min_age` seconds (other servers
        may be writing younger ones); returns how many."""


class LocalStorage:
    """Files under `root` (the data folder): `outputs/<id>.mp4`, `outputs/<id>.jpg`, `inputs/<id>.<field>`,
    `files/<id>`; files about to be put are written in `staging/` first, so a put is a rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStorage) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def check(self) -> None:
        for folder in ("outputs", "inputs", "files", "staging"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"the data folder {self.root}"

    def staging_dir(self) -> Path:
        return self.root / "staging"

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """A refusal of the file system (full, read-only, I/O error) as a StorageError; a missing file stays
        FileNotFoundError."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"{self.describe()}: could not {what} ({exc.strerror or exc})") from None

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        target = self.path(key)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with self._errors(f"store {key}"):
                partial.write_bytes(data)
                partial.replace(target)
        finally:
            with contextlib.suppress(OSError):  # else removed by the next start's sweep
                partial.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        target = self.path(key)
        try:
            path.replace(target)  # from the staging folder: the same file system, a rename
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise StorageError(f"{self.describe()}: could not store {key} ({exc.strerror})") from None
            self.put_bytes(key, path.read_bytes(), content_type)  # from another file system: copied
            path.unlink(missing_ok=True)

    def read(self, key: str) -> bytes:
        with self._errors(f"read {key}"):
            return self.path(key).read_bytes()

    def read_range(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        with self._errors(f"read {key}"):
            handle = self.path(key).open("rb")  # opened now: a missing file raises here, not mid-answer
            handle.seek(start)
        return _file_chunks(handle, None if end is None else end - start)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            result = self.path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(
            size=result.st_size,
            etag=f'"{result.st_mtime_ns:x}-{result.st_size:x}"',
            modified=datetime.fromtimestamp(result.st_mtime, UTC),
        )

    def delete(self, key: str) -> None:
        with self._errors(f"delete {key}"):
            self.path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        folder = self.root / prefix.strip("/")
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                yield f"{prefix.strip('/')}/{path.name}", modified

    def local_path(self, key: str) -> Path:
        return self.path(key)

    def presigned_url(self, key: str, expires_in: int) -> None:
        return None

    def sweep(self, min_age: float) -> int:
        """Half-written files (`.<name>.partial`, and `.<id>.part` of uploads before the staging folder)
        and staging folders of writes a killed process never finished."""
        staging = self.staging_dir()
        left = [
            *(self.root / "outputs").glob(".*.partial"),
            *(self.root / "inputs").glob(".*.partial"),
            *(self.root / "files").glob(".*.part"),
            *(self.root / "files").glob(".*.partial"),
            *(staging.iterdir() if staging.is_dir() else ()),
        ]
        removed, now = 0, time.time()
        for path in left:
            try:
                if min_age and now - path.stat().st_mtime < min_age:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("could not remove the half-written %s (%s)", path, exc)
        return removed


class S3Storage:
    """Objects in an S3-compatible bucket, under `prefix`; the client comes from boto3's credential chain
    (AWS_* variables, the shared config files, an instance or pod role) and `endpoint_url` when not AWS."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Storage) and self.__getstate__() == other.__getstate__()

    def __hash__(self) -> int:
        return hash(tuple(self.__getstate__().values()))

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise StorageError(
                        "S3 storage needs boto3: pip install 'i2v[s3]' (or unset I2V_STORAGE_URL)"
                    ) from None
                # SigV4, which every S3-compatible store takes; path-style addressing for endpoints such as
                # MinIO and Ceph that serve no bucket subdomains.
                config = Config(
                    signature_version="s3v4",
                    retries={"mode": "standard", "max_attempts": 4},
                    connect_timeout=10,
                    read_timeout=60,
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                )
                session = boto3.session.Session()
                self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
            return self._client

    def name(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def staging_dir(self) -> None:
        return None

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """botocore's errors as a StorageError naming the bucket; a missing object as FileNotFoundError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(errno.ENOENT, f"{what}: no such object", self.describe()) from None
            reason = {
                "NoSuchBucket": "the bucket does not exist (create it first)",
                "403": "access denied: these credentials may not use this bucket",
                "AccessDenied": "access denied: these credentials may not use this bucket",
            }.get(code) or str(error.get("Message") or exc)
            raise StorageError(f"storage {self.describe()}: {what}: {reason}") from None
        except BotoCoreError as exc:
            raise StorageError(f"storage {self.describe()}: {what}: {exc}") from None

    def check(self) -> None:
        from botocore.exceptions import NoCredentialsError

        try:
            with self._errors("the bucket cannot be used"):
                self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageError(
                f"storage {self.describe()}: no credentials found; boto3 reads AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an instance or pod role"
            ) from None
        except FileNotFoundError:  # HEAD answers a bare 404 for a missing bucket
            raise StorageError(
                f"storage {self.describe()}: the bucket does not exist (create it first)"
            ) from None

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        with self._errors(f"could not store {key}"):
            self.client.put_object(
                Bucket=self.bucket, Key=self.name(key), Body=data, ContentType=content_type
            )

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        with self._errors(f"could not store {key}"):
            self.client.upload_file(
                str(path), self.bucket, self.name(key), ExtraArgs={"ContentType": content_type}
            )
        path.unlink(missing_ok=True)

    def read(self, key: str) -> bytes:
        with self._errors(f"get {key}"):
            answer = self.client.get_object(Bucket=self.bucket, Key=self.name(key))
            with contextlib.closing(answer["Body"]) as body:
                return body.read()

    def read_range(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.name(key)}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with self._errors(f"get {key}"):  # asked now: a missing object raises here, not mid-answer
            answer = self.client.get_object(**params)
        return self._body_chunks(key, answer["Body"])

    def _body_chunks(self, key: str, body: Any) -> Iterator[bytes]:
        with contextlib.closing(body), self._errors(f"get {key}"):
            yield from body.iter_chunks(CHUNK)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors(f"head {key}"):
                head = self.client.head_object(Bucket=self.bucket, Key=self.name(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(size=head["ContentLength"], etag=head["ETag"], modified=head["LastModified"])

    def delete(self, key: str) -> None:
        with self._errors(f"delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.name(key))

    def keys(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        base = f"{self.prefix}/" if self.prefix else ""
        with self._errors(f"list {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"][len(base) :], item["LastModified"]

    def local_path(self, key: str) -> None:
        return None

    def presigned_url(self, key: str, expires_in: int) -> str:
        from botocore.exceptions import NoCredentialsError

        try:
            with self._errors(f"presign {key}"):
                return self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self.name(key)},
                    ExpiresIn=max(1, min(PRESIGN_MAX_S, expires_in)),
                )
        except NoCredentialsError:
            raise StorageError(f"storage {self.describe()}: no credentials to sign a URL with") from None

    def sweep(self, min_age: float) -> int:
        return 0  # an upload that never finished leaves no object (a bucket rule ends stale multiparts)


def _file_chunks(handle: Any, left: int | None) -> Iterator[bytes]:
    with handle:
        while left is None or left > 0:
            chunk = handle.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


def parse_storage_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix); ValueError with the rule otherwise."""
    parts = urlsplit(url.strip())
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            f"expected s3://bucket or s3://bucket/prefix (unset: files under the data folder), got {url!r}"
        )
    if not _BUCKET.fullmatch(parts.netloc):
        raise ValueError(
            f"{parts.netloc!r} is not a bucket name (3 to 63 lowercase letters, digits, dots and hyphens)"
        )
    return parts.netloc, parts.path.strip("/")


def open_storage(storage_url: str | None, data_dir: Path, endpoint_url: str | None = None) -> Storage:
    """The configured storage: S3 for `s3://bucket/prefix`, else files under the data folder."""
    if not storage_url:
        return LocalStorage(data_dir)
    bucket, prefix = parse_storage_url(storage_url)
    return S3Storage(bucket, prefix, endpoint_url)


@contextlib.contextmanager
def staged(storage: Storage, name: str) -> Iterator[Path]:
    """A path named `name` to write a file at before it is put into `storage`, in a folder of its own that
    is removed afterwards with whatever is left in it."""
    folder = storage.staging_dir()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="i2v-", dir=folder))
    try:
        yield scratch / name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
