"""A prediction's output URL, as the API hands it out (`I2V_OUTPUT_URLS`).

- `signed` (the default): like Replicate's, a link that needs no token, unguessable and expiring:
  `{base}/outputs/{id}.mp4?expires={unix time}&signature={HMAC-SHA256}`, served by this server from
  wherever the mp4 is stored (files under the data folder, or the bucket), with HEAD, ETag and ranges. Any
  client fetches it, the official ones included (the JS client's `FileOutput` sends no token; the Python
  client's sends one, which this route ignores).
- `token`: `{base}/v1/predictions/{id}/output.mp4`, behind the API token, for operators who want every
  byte behind it.
- `presigned` (S3 storage only): the bucket's own presigned URL; the bytes go from the bucket to the
  client. The bucket refuses a request that also carries an Authorization header (S3's "only one auth
  mechanism"), which the Python client's `FileOutput.read()` sends: see docs/deploy.md.

A link lasts `I2V_OUTPUT_URL_LIFETIME` from when it is handed out (default: the retention period, else 7
days), and never past the output's deletion by retention: with `I2V_RETENTION` alone, every link to an
output expires when the output does. Answers within a step of the lifetime (1/24th of it, at most an hour)
carry the same signed link.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from .config import ServerConfig
from .schemas import APIError
from .storage import Storage, output_key
from .store import PredictionRow, Store
from .webhooks import read_or_make_secret

DEFAULT_LIFETIME_S = 7 * 24 * 3600  # without a lifetime or a retention period (S3's longest presign)
SIGNED_ROUTE = "/outputs"
_NAME = re.compile(r"([a-z0-9][a-z0-9_-]{0,80})\.mp4")  # any id a storage key may hold (storage._KEY)
KEY_FILE = "output_url_key"


def link_key(data_dir: Path, configured: str | None, store: Store | None = None) -> bytes:
    """The key links are signed with: `I2V_OUTPUT_URL_SECRET`, else one made on first start and kept in the
    data folder (owner-only); with several servers on one database, kept in the database instead, so every
    server signs and checks links alike (seeded from the data folder's key when it has one)."""
    if configured:
        return configured.encode()
    kept = data_dir / KEY_FILE
    if store is not None and store.shared:
        made = store.shared_value(
            KEY_FILE, lambda: kept.read_text().strip() if kept.is_file() else secrets.token_hex(32)
        )
        return bytes.fromhex(made)
    return bytes.fromhex(read_or_make_secret(kept, lambda: secrets.token_hex(32)))


def sign(key: bytes, prediction_id: str, expires: int) -> str:
    message = f"{output_key(prediction_id)}\n{expires}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _forbidden(detail: str) -> APIError:
    return APIError(403, "Forbidden", detail)


class OutputLinks:
    def __init__(
        self, config: ServerConfig, storage: Storage, key: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        self.config, self.storage, self.key, self.clock = config, storage, key, clock
        self.lifetime = config.output_url_lifetime or config.retention or DEFAULT_LIFETIME_S

    def url(self, row: PredictionRow, base: str) -> str | None:
        """The prediction's output URL as the API shows it; None without an output (or once removed)."""
        if not row.output or row.data_removed:
            return None
        mode = self.config.output_urls
        if mode == "token":
            return f"{base}/v1/predictions/{row.id}/output.mp4"
        now = self.clock()
        expires = self.expires(row, now)
        if mode == "presigned":
            url = self.storage.presigned_url(output_key(row.id), math.ceil(expires - now))
            if url is not None:
                return url
        return (
            f"{base}{SIGNED_ROUTE}/{row.id}.mp4?expires={expires}&signature={sign(self.key, row.id, expires)}"
        )

    def expires(self, row: PredictionRow, now: float) -> int:
        """When a link handed out at `now` stops working (unix seconds): a lifetime from the start of the
        current step since the output was made (steps of 1/24th of the lifetime, at most an hour), so every
        answer within a step carries the same link; never after retention removes the output."""
        done = row.completed_at.replace(tzinfo=UTC).timestamp() if row.completed_at else now
        step = max(1, min(3600, int(self.lifetime // 24)))
        expires = math.floor(done + max(0.0, now - done) // step * step + self.lifetime)
        if self.config.retention:
            expires = min(expires, math.floor(done + self.config.retention))
        return expires

    def verify(self, name: str, expires: str | None, signature: str | None) -> str:
        """The prediction id a signed link names, once its signature and time check out; 403 otherwise,
        saying which, and 404 for a name that is no output's."""
        match = _NAME.fullmatch(name)
        if match is None:
            raise APIError(404, "Not found", f"{SIGNED_ROUTE}/{name} was not found")
        if self.config.output_urls == "token":
            raise _forbidden(
                "this server hands out output URLs behind the API token (I2V_OUTPUT_URLS=token); "
                "use the prediction's output URL with your token"
            )
        prediction_id = match.group(1)
        if not expires or not signature or not expires.isdigit() or len(expires) > 12:
            raise _forbidden(
                "this output link is not signed: it needs the expires and signature parameters the API gave it"
            )
        if not hmac.compare_digest(signature.encode(), sign(self.key, prediction_id, int(expires)).encode()):
            raise _forbidden(
                "this output link's signature does not match: the link was changed, or signed with another "
                "key (I2V_OUTPUT_URL_SECRET)"
            )
        if int(expires) <= self.clock():
            at = datetime.fromtimestamp(int(expires), UTC).isoformat().replace("+00:00", "Z")
            raise _forbidden(f"this output link expired at {at}; get the prediction again for a fresh link")
        return prediction_id

    def remaining(self, expires: str) -> int:
        """Seconds a verified link has left (for Cache-Control)."""
        return max(0, int(expires) - int(self.clock()))
