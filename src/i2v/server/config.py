"""Server settings: from the command line and the environment, checked once at start-up."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..devices import device_group
from ..errors import I2VError
from ..images import _allowlist_from_env
from .webhooks import RETRY_DELAYS

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
DEFAULT_PORT = 8000
# Two 10 MB images sent inline as base64 data URIs fit with room to spare.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
# The official client polls each running prediction twice a second; 40 requests/s leaves room for many.
DEFAULT_REQUEST_RATE = 2400
DEFAULT_CREATE_RATE = 60
DEFAULT_MAX_UNFINISHED = 50

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


def parse_duration(text: str, name: str) -> float | None:
    """'3600', '90s', '30m', '1h', '7d' -> seconds; '', '0', 'off' -> None (never)."""
    text = text.strip().lower()
    if text in ("", "0", "off", "never", "none"):
        return None
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{name}: expected a duration like 3600, 90s, 30m, 1h or 7d, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _int(name: str, default: int) -> int:
    """A count from the environment; '0' or 'off' turns the limit off (returned as 0)."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("off", "none", "never"):
        return 0
    if not text.isdigit():
        raise ConfigError(f"{name}: expected a whole number (0 or off for no limit), got {text!r}")
    return int(text)


def _delays(name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"{name}: expected seconds separated by commas, like 1,2,4,8, got {text!r}"
        ) from None


def _tokens_from_env() -> tuple[str, ...]:
    return tuple(t.strip() for t in os.environ.get("I2V_API_TOKEN", "").split(",") if t.strip())


def _default_data_dir() -> Path:
    explicit = os.environ.get("I2V_DATA_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "i2v"


@dataclass(frozen=True)
class ServerConfig:
    """Everything the service needs to know; `from_env` fills what the command line leaves open.

    - tokens: accepted API tokens (`I2V_API_TOKEN`, comma-separated). Empty only with `no_auth`.
    - public_url: the origin clients reach us at (`I2V_PUBLIC_URL`, e.g. https://video.example.com behind a
      reverse proxy); output and file URLs are built from it. Unset: taken from each request's Host.
    - retention: seconds after which outputs and inputs are deleted (`I2V_RETENTION`, e.g. 1h); None: kept.
    - retry_on_restart: a prediction interrupted by a restart of the server or of its worker process runs
      once more instead of failing (`I2V_RETRY_ON_RESTART=1`).
    - devices: one worker process per entry (`I2V_DEVICES=cuda:0,cuda:1`); None lets the engine choose.
      An entry may be a group, `cuda:0+cuda:1`: its worker splits each request across those GPUs.
    - fetch_allow: hosts or networks image URLs may reach although private (`I2V_FETCH_ALLOW`).
    - max_body_bytes: largest request body outside the Files API (`I2V_MAX_BODY_BYTES`); 413 above it.
    - request_rate / create_rate: API requests / prediction creates per minute per token
      (`I2V_REQUEST_RATE`, `I2V_CREATE_RATE`; a full minute's worth may come in one burst); 429 above it.
    - max_unfinished: predictions per token waiting or running at once (`I2V_MAX_UNFINISHED`); 429 above it.
    Limits set to 0 are off.
    - webhook_retry_delays: seconds between retries of a terminal webhook (`I2V_WEBHOOK_RETRY_DELAYS`).
    """

    data_dir: Path
    model: str | None = None
    host: str = ALL_INTERFACES
    port: int = DEFAULT_PORT
    tokens: tuple[str, ...] = ()
    no_auth: bool = False
    public_url: str | None = None
    retention: float | None = None
    retry_on_restart: bool = False
    devices: tuple[str | None, ...] = (None,)
    webhook_secret: str | None = None
    model_names: tuple[str, ...] = field(default=("i2v/default", "kwaivgi/kling-v2.1"))
    fetch_allow: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_rate: int = DEFAULT_REQUEST_RATE
    create_rate: int = DEFAULT_CREATE_RATE
    max_unfinished: int = DEFAULT_MAX_UNFINISHED
    webhook_retry_delays: tuple[float, ...] = RETRY_DELAYS

    @classmethod
    def from_env(
        cls,
        *,
        host: str | None = None,
        port: int | None = None,
        model: str | None = None,
        data_dir: str | Path | None = None,
        no_auth: bool = False,
    ) -> ServerConfig:
        tokens = _tokens_from_env()
        if not tokens and not no_auth:
            raise ConfigError(
                "no API token: set I2V_API_TOKEN (one or several, comma-separated), "
                "or pass --no-auth to serve without authentication on loopback"
            )
        public_url = os.environ.get("I2V_PUBLIC_URL", "").strip().rstrip("/") or None
        if public_url and not re.match(r"^https?://[^/]+", public_url):
            raise ConfigError(
                "I2V_PUBLIC_URL: expected an http(s) origin like https://video.example.com, "
                f"got {public_url!r}"
            )
        devices_env = [d.strip() for d in os.environ.get("I2V_DEVICES", "").split(",") if d.strip()]
        for spec in devices_env:
            try:
                device_group(spec)
            except I2VError as exc:
                raise ConfigError(f"I2V_DEVICES: {exc}") from exc
        return cls(
            data_dir=Path(data_dir).expanduser() if data_dir else _default_data_dir(),
            model=model or os.environ.get("I2V_MODEL", "").strip() or None,
            # Without authentication, only this machine may connect unless the operator says otherwise.
            host=host or (LOOPBACK if no_auth else ALL_INTERFACES),
            port=DEFAULT_PORT if port is None else port,
            tokens=tokens,
            no_auth=no_auth,
            public_url=public_url,
            retention=parse_duration(os.environ.get("I2V_RETENTION", ""), "I2V_RETENTION"),
            retry_on_restart=_flag("I2V_RETRY_ON_RESTART"),
            devices=tuple(devices_env) or (None,),
            webhook_secret=os.environ.get("I2V_WEBHOOK_SECRET", "").strip() or None,
            fetch_allow=_allowlist_from_env(),
            max_body_bytes=_int("I2V_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            request_rate=_int("I2V_REQUEST_RATE", DEFAULT_REQUEST_RATE),
            create_rate=_int("I2V_CREATE_RATE", DEFAULT_CREATE_RATE),
            max_unfinished=_int("I2V_MAX_UNFINISHED", DEFAULT_MAX_UNFINISHED),
            webhook_retry_delays=_delays("I2V_WEBHOOK_RETRY_DELAYS", RETRY_DELAYS),
        )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "i2v.db"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"
