"""Alembic's entry point: migrations run on the connection `i2v.server.migrations.upgrade` opened (online),
or print their SQL for the URL given (offline, `i2v migrate --sql`)."""

from __future__ import annotations

from alembic import context

config = context.config

if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    context.configure(connection=config.attributes["connection"])
    with context.begin_transaction():
        context.run_migrations()
