"""`i2v serve`: check the settings, then run the app under uvicorn."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..errors import I2VError
from ..settings import Settings
from .config import ServerConfig
from .store import DataDirLock

KEEP_ALIVE_S = 75


def serve(
    *,
    host: str | None,
    port: int | None,
    model: str | None,
    data_dir: Path | None,
    no_auth: bool,
) -> int:
    try:
        config = ServerConfig.from_env(host=host, port=port, model=model, data_dir=data_dir, no_auth=no_auth)
        Settings()  # the engine's settings too (the workers read them): a bad one stops the start here
        # SQLite mode: one server per data dir (held until this process ends, however it ends).
        lock = DataDirLock(config.data_dir)
        config.storage().check()  # a bucket that is missing or refuses these credentials stops the start
    except I2VError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    # force: the CLI configured logging for one-shot commands (warnings only); a server says more
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not every fetch and webhook URL in the log
    if config.no_auth:
        logging.getLogger(__name__).warning("serving WITHOUT authentication on %s", config.host)
    app = create_app(config)
    # Keep idle connections longer than the usual 60 s of load balancers and client pools: a server that
    # drops them first makes a client's next request on that connection fail with a reset.
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="info",
        proxy_headers=True,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    lock.release()
    return 0
