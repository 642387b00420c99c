"""The schema before migrations: predictions, files and webhook deliveries (issue 16's columns included).

Adopts a database that `create_all` made before Alembic came in: it creates only the tables, columns and
indexes that are missing, so a data dir from any earlier version upgrades in place, its rows kept. The
texts clients supply (a file's name and type, the request's origin) are TEXT here: SQLite never enforced
the VARCHAR lengths older versions declared, and PostgreSQL would refuse a longer one.

Revision ID: 0001
Revises:
Create Date: 2026-11-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _predictions() -> list[sa.Column]:
    return [
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.String(200), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("output", sa.String(300), nullable=True),
        sa.Column("logs", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=True),
        sa.Column("completed_at", sa.DateTime, nullable=True),
        sa.Column("predict_time", sa.Float, nullable=True),
        sa.Column("data_removed", sa.Boolean, nullable=False),
        sa.Column("webhook", sa.Text, nullable=True),
        sa.Column("webhook_events_filter", sa.JSON, nullable=False),
        sa.Column("base_url", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("owner", sa.String(64), nullable=False, server_default=""),
    ]


def _files() -> list[sa.Column]:
    return [
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("md5", sa.String(32), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=True),
        sa.Column("owner", sa.String(64), nullable=False, server_default=""),
    ]


def _deliveries() -> list[sa.Column]:
    return [
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("prediction_id", sa.String(40), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("terminal", sa.Boolean, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(64), nullable=False, server_default=""),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
    ]


# table -> (its columns, its indexes as (column, unique)), named as `create_all` named them: ix_<table>_<col>
TABLES = {
    "predictions": (_predictions, [("id", True), ("status", False), ("owner", False)]),
    "files": (_files, [("id", True), ("owner", False)]),
    "webhook_deliveries": (_deliveries, [("id", True), ("prediction_id", False), ("state", False)]),
}


def upgrade() -> None:
    inspector = None if context.is_offline_mode() else sa.inspect(op.get_bind())
    for name, (columns, indexes) in TABLES.items():
        if inspector is None or not inspector.has_table(name):
            op.create_table(name, *columns())
            present_indexes: set[str] = set()
        else:  # made by an older version: add what it lacks (the owner columns came with per-token access)
            present = {c["name"] for c in inspector.get_columns(name)}
            for column in columns():
                if column.name not in present:
                    # rows already there have no value for a column without a default: allow none
                    column.nullable = column.nullable or column.server_default is None
                    op.add_column(name, column)
            present_indexes = {i["name"] for i in inspector.get_indexes(name)}
        for column, unique in indexes:
            index = f"ix_{name}_{column}"
            if index not in present_indexes:
                op.create_index(index, name, [column], unique=unique)


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
