"""The database's schema changes, as Alembic migrations shipped in the package, for SQLite and PostgreSQL.

`upgrade(engine)` brings a database to the newest schema; `i2v serve` calls it at every start, so an
operator never runs a migration by hand (`i2v migrate` does the same ahead of a start, or prints the SQL).
On PostgreSQL the upgrade holds an advisory lock, so servers starting together migrate one after the other
(the later ones find nothing left to do). A database made before the migrations existed (SQLite from
`create_all`) is adopted by the first revision, which creates only what is missing.

Each revision adds (tables, columns with defaults, indexes): a server one version older keeps working on
the newer schema during a rolling restart.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

FOLDER = Path(__file__).resolve().parent
# The key of the advisory lock servers take while they migrate a PostgreSQL database.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"i2v migrations").digest()[:8], "big", signed=True)


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(FOLDER))
    return config


def head() -> str:
    """The newest revision this version of i2v knows."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: empty, or from before the migrations)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every migration the database lacks, in one transaction where the database allows it; returns
    (the revision before, the revision now)."""
    config = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        before = MigrationContext.configure(conn).get_current_revision()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return before, head()


def upgrade_sql(url: str, since: str | None = None) -> str:
    """The SQL `upgrade` would run on an empty database (or from revision `since`), for a DBA to apply."""
    config = _config()
    config.set_main_option("sqlalchemy.url", url)
    out = io.StringIO()
    config.output_buffer = out
    command.upgrade(config, f"{since}:head" if since else "head", sql=True)
    return out.getvalue()
