"""Callback events (901-909) and the unheard end of a reply cut by event 905

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "callback_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=256), nullable=True),
        sa.Column("trtc_round_id", sa.String(length=256), nullable=True),
        sa.Column("round_id", sa.String(length=32), nullable=True),
        sa.Column("event_ms_ts", sa.BigInteger(), nullable=True),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_events")),
        sa.UniqueConstraint("digest", name=op.f("uq_callback_events_digest")),
    )
    op.create_index("ix_callback_events_task_type", "callback_events", ["task_id", "event_type"])
    with op.batch_alter_table("rounds") as batch_op:
        batch_op.add_column(sa.Column("unheard", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch_op:
        batch_op.drop_column("unheard")
    op.drop_index("ix_callback_events_task_type", table_name="callback_events")
    op.drop_table("callback_events")
