"""Server settings: from the command line and the environment, checked once at start-up."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
DEFAULT_PORT = 8000

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
    - retry_on_restart: a prediction interrupted by a restart runs once more instead of failing
      (`I2V_RETRY_ON_RESTART=1`).
    - devices: one worker process per entry (`I2V_DEVICES=cuda:0,cuda:1`); None lets the engine choose.
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
