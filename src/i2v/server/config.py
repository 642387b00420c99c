"""Server settings: flags from the command line over the environment over defaults, checked once at start.

Built like the engine's settings (`i2v.settings`): one table names the variables, and a bad value stops
`i2v serve` with one line naming the variable.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..devices import WorkerSpec, worker_spec
from ..errors import I2VError
from ..parsing import CommaList, Duration, Flag, Limit, Seconds
from ..parsing import parse_duration as _parse_duration
from ..request import MODES, Mode
from ..settings import EnvSettings, FieldPath, xdg_data_home
from .storage import Storage, open_storage, parse_storage_url

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
DEFAULT_PORT = 8000
# Two 10 MB images sent inline as base64 data URIs fit with room to spare.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
# The official client polls each running prediction twice a second; 40 requests/s leaves room for many.
DEFAULT_REQUEST_RATE = 2400
DEFAULT_CREATE_RATE = 60
DEFAULT_MAX_UNFINISHED = 50
DEFAULT_FETCH_TIMEOUT = 30.0  # seconds for a create's images, waiting for a slot included
DEFAULT_FETCHES_PER_TOKEN = 4  # creates of one token fetching or decoding images at once
DEFAULT_FETCHES_TOTAL = 16  # ... of all tokens together
DEFAULT_BODY_TIMEOUT = 120.0  # seconds for a request body to arrive in full (a 100 MB upload at ~1 MB/s)
DEFAULT_BODY_MEMORY = 256 * 2**20  # bytes of request bodies held in memory at once, all requests together
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # after the first try of a terminal webhook: ~63 s in all
_ORIGIN = re.compile(r"^https?://[^/]+")


class ConfigError(I2VError, ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


def parse_duration(text: str, name: str) -> float | None:
    """'3600', '90s', '30m', '1h', '7d' -> seconds; '', '0', 'off' -> None (never); errors name `name`."""
    try:
        return _parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


class ServerConfig(EnvSettings):
    """Everything the service needs to know; `from_env` lets the command line's flags win.

    - tokens: accepted API tokens (`I2V_API_TOKEN`, comma-separated). Empty only with `no_auth`.
    - public_url: the origin clients reach us at (`I2V_PUBLIC_URL`, e.g. https://video.example.com behind a
      reverse proxy); output and file URLs are built from it. Unset: taken from each request's Host.
    - retention: seconds after which outputs and inputs are deleted (`I2V_RETENTION`, e.g. 1h); None: kept.
    - retry_on_restart: a prediction interrupted by a restart of the server or of its worker process runs
      once more instead of failing (`I2V_RETRY_ON_RESTART=1`).
    - devices: one worker process per entry (`I2V_DEVICES=cuda:0,cuda:1`); unset lets the engine choose.
      An entry may be a group, `cuda:0+cuda:1`: its worker splits each request across those GPUs; and it
      may name the one mode its worker serves, `standard@cuda:0,pro@cuda:1+cuda:2` (without: every mode).
    - fetch_allow: hosts or networks image URLs may reach although private (`I2V_FETCH_ALLOW`).
    - max_body_bytes: largest request body outside the Files API (`I2V_MAX_BODY_BYTES`); 413 above it.
    - request_rate / create_rate: API requests / prediction creates per minute per token
      (`I2V_REQUEST_RATE`, `I2V_CREATE_RATE`; a full minute's worth may come in one burst); 429 above it.
    - max_unfinished: predictions per token waiting or running at once (`I2V_MAX_UNFINISHED`); 429 above it.
    Limits set to 0 are off.
    - webhook_retry_delays: seconds between retries of a terminal webhook (`I2V_WEBHOOK_RETRY_DELAYS`).
    - preload: the models each worker pulls (downloads when missing) and loads before it reports READY
      (`I2V_PRELOAD`): `all` (every mode's), `standard`, or `none` (each loads on its first prediction);
      unset: every mode. Each worker preloads only those it serves (`mode@device`) and can hold on its budget.
    - fetch_timeout: seconds a create may spend on its images, fetches and the wait for a slot included
      (`I2V_FETCH_TIMEOUT`); fetches_per_token / fetches_total: creates fetching or decoding images at
      once, per token and in all (`I2V_FETCHES_PER_TOKEN`, `I2V_FETCHES_TOTAL`), in threads of their own.
    - body_timeout: seconds a request body may take to arrive (`I2V_BODY_TIMEOUT`; 408 after);
      body_memory: bytes of request bodies held in memory at once (`I2V_BODY_MEMORY`; 429 above).
    - metrics_token: the credential of `/metrics` (`I2V_METRICS_TOKEN`); API tokens cannot read it.
    - trusted_hosts: the Host names requests may carry (`I2V_TRUSTED_HOSTS`, `*.example.com` allowed);
      others get 400. URLs are built from the Host when no public URL is set.
    - storage_url: where uploads, inputs and outputs are kept (`I2V_STORAGE_URL`): unset, files under the
      data folder; `s3://bucket/prefix`, an S3-compatible bucket (credentials: boto3's own chain), at
      `s3_endpoint_url` (`I2V_S3_ENDPOINT_URL`) for MinIO, R2, Ceph RGW and the like.
    - output_urls: what a prediction's `output` is (`I2V_OUTPUT_URLS`): `signed` (default), an expiring
      signed link to this server that needs no token, like Replicate's; `token`, a link behind the API
      token; `presigned` (S3 only), the bucket's own presigned URL (see links.py for what each is).
    - output_url_lifetime: how long a signed link works from when it is handed out
      (`I2V_OUTPUT_URL_LIFETIME`); unset: the retention period, else 7 days. Never past the retention.
    - output_url_secret: the key links are signed with (`I2V_OUTPUT_URL_SECRET`); unset, one kept in the
      data folder, or in the database when several servers share it.
    - database_url: where predictions, files and webhooks are recorded (`I2V_DATABASE_URL`): unset, SQLite
      in the data dir (one server); `postgresql+psycopg://user:password@host/db` lets several servers
      share it (docs/deploy.md). `postgresql://` and `postgres://` mean psycopg too.
    - runner: where predictions run (`I2V_RUNNER`): `local`, worker processes on this machine's devices
      (`devices`), or `ray`, actors on the GPU nodes of a Ray cluster (`i2v.server.ray_runner`):
      ray_address (`I2V_RAY_ADDRESS`: `auto` for the cluster this machine is part of, `host:port` of its
      head, or `ray://host:10001` through Ray Client), ray_gpu_resource (`I2V_RAY_GPU_RESOURCE`: the node
      resource one GPU is counted in; `GPU` is Ray's own), ray_gpus_per_worker (`I2V_RAY_GPUS_PER_WORKER`:
      GPUs per actor; above 1 each actor splits a clip across its GPUs like a local group), ray_namespace
      (`I2V_RAY_NAMESPACE`: the Ray namespace of this deployment; of all its servers on one cluster, one at
      a time places and drives the workers, so two deployments share a cluster under two namespaces).
    """

    ENVIRONMENT: ClassVar[Mapping[str, FieldPath]] = {
        "I2V_API_TOKEN": ("tokens",),
        "I2V_PUBLIC_URL": ("public_url",),
        "I2V_RETENTION": ("retention",),
        "I2V_RETRY_ON_RESTART": ("retry_on_restart",),
        "I2V_DEVICES": ("devices",),
        "I2V_DATA_DIR": ("data_dir",),
        "I2V_MODEL": ("model",),
        "I2V_WEBHOOK_SECRET": ("webhook_secret",),
        "I2V_FETCH_ALLOW": ("fetch_allow",),
        "I2V_MAX_BODY_BYTES": ("max_body_bytes",),
        "I2V_REQUEST_RATE": ("request_rate",),
        "I2V_CREATE_RATE": ("create_rate",),
        "I2V_MAX_UNFINISHED": ("max_unfinished",),
        "I2V_WEBHOOK_RETRY_DELAYS": ("webhook_retry_delays",),
        "I2V_PRELOAD": ("preload",),
        "I2V_FETCH_TIMEOUT": ("fetch_timeout",),
        "I2V_FETCHES_PER_TOKEN": ("fetches_per_token",),
        "I2V_FETCHES_TOTAL": ("fetches_total",),
        "I2V_BODY_TIMEOUT": ("body_timeout",),
        "I2V_BODY_MEMORY": ("body_memory",),
        "I2V_METRICS_TOKEN": ("metrics_token",),
        "I2V_TRUSTED_HOSTS": ("trusted_hosts",),
        "I2V_STORAGE_URL": ("storage_url",),
        "I2V_S3_ENDPOINT_URL": ("s3_endpoint_url",),
        "I2V_OUTPUT_URLS": ("output_urls",),
        "I2V_OUTPUT_URL_LIFETIME": ("output_url_lifetime",),
        "I2V_OUTPUT_URL_SECRET": ("output_url_secret",),
        "I2V_DATABASE_URL": ("database_url",),
        "I2V_RUNNER": ("runner",),
        "I2V_RAY_ADDRESS": ("ray_address",),
        "I2V_RAY_GPU_RESOURCE": ("ray_gpu_resource",),
        "I2V_RAY_GPUS_PER_WORKER": ("ray_gpus_per_worker",),
        "I2V_RAY_NAMESPACE": ("ray_namespace",),
    }
    error: ClassVar[type[Exception]] = ConfigError

    data_dir: Path = Field(default_factory=lambda: xdg_data_home() / "i2v")
    model: str | None = None
    host: str = ALL_INTERFACES  # LOOPBACK when no_auth and no host is given
    port: int = DEFAULT_PORT
    tokens: CommaList = ()
    no_auth: bool = False
    public_url: str | None = None
    retention: Duration = None
    retry_on_restart: Flag = False
    devices: tuple[WorkerSpec, ...] = (WorkerSpec(),)
    webhook_secret: str | None = None
    # The names the model answers to; the first is the one a create by bare version id is filed under.
    model_names: tuple[str, ...] = ("kwaivgi/kling-v2.1", "i2v/default")
    fetch_allow: CommaList = ()
    max_body_bytes: Limit = DEFAULT_MAX_BODY_BYTES
    request_rate: Limit = DEFAULT_REQUEST_RATE
    create_rate: Limit = DEFAULT_CREATE_RATE
    max_unfinished: Limit = DEFAULT_MAX_UNFINISHED
    webhook_retry_delays: Seconds = RETRY_DELAYS
    preload: Literal["all", "standard", "none"] | None = None
    fetch_timeout: Duration = DEFAULT_FETCH_TIMEOUT
    fetches_per_token: Limit = DEFAULT_FETCHES_PER_TOKEN
    fetches_total: Limit = DEFAULT_FETCHES_TOTAL
    body_timeout: Duration = DEFAULT_BODY_TIMEOUT
    body_memory: Limit = DEFAULT_BODY_MEMORY
    metrics_token: str | None = None
    trusted_hosts: CommaList = ()
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    output_urls: Literal["signed", "token", "presigned"] = "signed"
    output_url_lifetime: Duration = None
    output_url_secret: str | None = None
    database_url: str | None = None
    runner: Literal["local", "ray"] = "local"
    ray_address: str = "auto"
    ray_gpu_resource: str = "GPU"
    ray_gpus_per_worker: int = Field(default=1, ge=1)
    ray_namespace: str = "i2v"

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
        """The settings with the command line's flags (those given) over the environment."""
        flags = {"host": host, "port": port, "model": model, "data_dir": data_dir}
        return cls(no_auth=no_auth, **{name: value for name, value in flags.items() if value is not None})

    @model_validator(mode="before")
    @classmethod
    def _loopback_without_auth(cls, values: Any) -> Any:
        # Without authentication, only this machine may connect unless the operator says otherwise.
        if isinstance(values, dict) and values.get("no_auth") and not values.get("host"):
            values = {**values, "host": LOOPBACK}
        return values

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("public_url")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        value = (value or "").strip().rstrip("/") or None
        if value and not _ORIGIN.match(value):
            raise ValueError(f"expected an http(s) origin like https://video.example.com, got {value!r}")
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        if value:
            parse_storage_url(value)
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        value = (value or "").strip().rstrip("/") or None
        if value and not _ORIGIN.match(value):
            raise ValueError(f"expected an http(s) URL like https://minio.example.com:9000, got {value!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if not sep:
            raise ValueError("expected a URL like postgresql+psycopg://user:password@host:5432/i2v")
        if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
            return f"postgresql+psycopg://{rest}"  # psycopg 3, a dependency of i2v (no build needed)
        if scheme != "sqlite":
            raise ValueError(
                f"{scheme}:// is not supported: use postgresql+psycopg://... (several servers) or "
                "sqlite:///path/i2v.db (one server; the default is the data dir's)"
            )
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(spec.strip() for spec in value.split(",") if spec.strip()) or (None,)
        try:
            return tuple(spec if isinstance(spec, WorkerSpec) else worker_spec(spec) for spec in value)
        except I2VError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("fetch_timeout", "body_timeout")
    @classmethod
    def _some_time(cls, value: float | None) -> float:
        if not value or value <= 0:
            raise ValueError("expected a time above zero, like 30 or 2m")
        return value

    @field_validator("fetches_per_token", "fetches_total")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("expected a whole number of 1 or more")
        return value

    @field_validator("ray_address", "ray_gpu_resource", "ray_namespace")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a value, not blank")
        return value.strip()

    @model_validator(mode="after")
    def _ray_runner(self) -> ServerConfig:
        if self.runner != "ray":
            return self
        if importlib.util.find_spec("ray") is None:
            raise ValueError("I2V_RUNNER=ray needs Ray, which is not installed here: pip install 'i2v[ray]'")
        if self.devices != (WorkerSpec(),):
            raise ValueError(
                "I2V_DEVICES names this machine's devices, for the local runner; with I2V_RUNNER=ray the "
                "GPUs are the cluster's (I2V_RAY_GPU_RESOURCE, I2V_RAY_GPUS_PER_WORKER): unset I2V_DEVICES"
            )
        return self

    @model_validator(mode="after")
    def _needs_a_token(self) -> ServerConfig:
        if not self.tokens and not self.no_auth:
            raise ValueError(
                "no API token: set I2V_API_TOKEN (one or several, comma-separated), "
                "or pass --no-auth to serve without authentication on loopback"
            )
        return self

    @model_validator(mode="after")
    def _presigned_needs_s3(self) -> ServerConfig:
        if self.output_urls == "presigned" and not self.storage_url:
            raise ValueError(
                "I2V_OUTPUT_URLS=presigned needs S3 storage (I2V_STORAGE_URL=s3://bucket/prefix); with files "
                "under the data folder, use signed (the default) or token"
            )
        return self

    @property
    def preload_modes(self) -> tuple[Mode, ...]:
        """The modes whose models a worker pulls and loads at start-up (`preload`)."""
        if self.preload == "none":
            return ()
        if self.preload == "standard":
            return ("standard",)
        return MODES  # "all", and unset: each worker takes the modes it serves (worker.preload_models)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "i2v.db"

    @property
    def store_url(self) -> str:
        """The database the store opens: `database_url`, else SQLite in the data dir."""
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def shared_database(self) -> bool:
        """Whether other servers may use the same database (PostgreSQL), so nothing may assume it is alone."""
        return not self.store_url.startswith("sqlite")

    def storage(self) -> Storage:
        """Where uploads, inputs and outputs are kept (`storage_url`; unset: the data folder)."""
        return open_storage(self.storage_url, self.data_dir, self.s3_endpoint_url)

    def base_url(self, request_base: str) -> str:
        """The origin URLs are built from: the public URL when set, else the one the request came to."""
        return self.public_url or request_base.rstrip("/")
