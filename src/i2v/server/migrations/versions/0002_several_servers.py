"""Several API servers on one database: who claimed a prediction or a webhook delivery, shared rate limits,
values every server uses alike.

- `predictions.claimed_by`, `webhook_deliveries.claimed_by`: the claiming server's key (`Store.claimant`,
  held as a PostgreSQL advisory lock while that server lives); a claim whose server is gone is recovered.
- `rate_buckets`: the per-token token buckets, so a rate holds across servers (PostgreSQL's clock).
- `shared_values`: e.g. the key the per-token webhook secrets derive from, the same on every server.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("claimed_by", sa.BigInteger, nullable=True))
    op.add_column("webhook_deliveries", sa.Column("claimed_by", sa.BigInteger, nullable=True))
    op.create_table(
        "rate_buckets",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("at", sa.Float, nullable=False),  # seconds since the epoch, by the database's clock
    )
    op.create_table(
        "shared_values",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("shared_values")
    op.drop_table("rate_buckets")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("claimed_by")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("claimed_by")
