"""`i2v serve`: check the settings, then run the app under uvicorn."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from sqlalchemy.exc import InterfaceError, OperationalError

from ..errors import I2VError
from ..settings import Settings
from . import migrations
from .config import ServerConfig
from .store import DataDirLock, StorageError, Store, check_shared_data_dir, open_engine, shown

KEEP_ALIVE_S = 75


def serve(
    *,
    host: str | None,
    port: int | None,
    model: str | None,
    data_dir: Path | None,
    no_auth: bool,
) -> int:
    # force: the CLI configured logging for one-shot commands (warnings only); a server says more
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not every fetch and webhook URL in the log
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the store says what an upgrade changed
    try:
        config = ServerConfig.from_env(host=host, port=port, model=model, data_dir=data_dir, no_auth=no_auth)
        Settings()  # the engine's settings too (the workers read them): a bad one stops the start here
        # SQLite mode: one server per data dir (held until this process ends, however it ends). On
        # PostgreSQL several servers share the database, and so the data dir's files too, unless those are
        # in a bucket (I2V_STORAGE_URL): then each server's data dir holds only its own staging files.
        lock = None if config.shared_database else DataDirLock(config.data_dir)
        store = Store(config.store_url)  # the schema upgraded here; an unreachable database stops us
        if store.shared and not config.storage_url:
            check_shared_data_dir(store, config.data_dir)
        config.storage().check()  # a bucket that is missing or refuses these credentials stops the start
    except I2VError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    if config.no_auth:
        logging.getLogger(__name__).warning("serving WITHOUT authentication on %s", config.host)
    app = create_app(config, store=store)
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
    if lock is not None:
        lock.release()
    return 0


def migrate(*, data_dir: Path | None, sql: bool, since: str | None) -> int:
    """`i2v migrate`: the database `i2v serve` would open, brought to the newest schema now (or its SQL)."""
    try:
        # the database's settings only: no token is needed to migrate
        config = ServerConfig.from_env(data_dir=data_dir, no_auth=True)
        if sql:
            print(migrations.upgrade_sql(config.store_url, since), end="")
            return 0
        lock = None if config.shared_database else DataDirLock(config.data_dir)  # not under a running server
        engine = open_engine(config.store_url)
        try:
            before, after = migrations.upgrade(engine)
        except (OperationalError, InterfaceError) as exc:
            raise StorageError(f"could not open the database {shown(config.store_url)}: {exc.orig}") from None
        finally:
            engine.dispose()
    except I2VError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = shown(config.store_url)
    print(
        f"{where}: upgraded from {before or 'empty'} to {after}"
        if before != after
        else f"{where}: at {after}, the newest"
    )
    if lock is not None:
        lock.release()
    return 0
