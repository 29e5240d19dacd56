"""Process leases (instances, rounds.owner, an index of pending rounds) and identifier columns
wide enough for every value the API accepts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.String(length=256)


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("process", sa.String(length=200), nullable=True),
        sa.Column("lease_expires", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    with op.batch_alter_table("tasks") as batch_op:
        for name, old in (("id", 128), ("sdk_app_id", 64), ("user_id", 128), ("room_id", 128), ("room_id_type", 8)):
            batch_op.alter_column(name, type_=_ID, existing_type=sa.String(length=old))
    with op.batch_alter_table("rounds") as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=32), nullable=True))
        for name in ("task_id", "request_id", "trtc_round_id", "model"):
            batch_op.alter_column(name, type_=_ID, existing_type=sa.String(length=128))
        batch_op.create_index(
            "ix_rounds_pending",
            ["owner"],
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )
    with op.batch_alter_table("messages") as batch_op:
        for name in ("name", "tool_call_id"):
            batch_op.alter_column(name, type_=sa.Text(), existing_type=sa.String(length=128))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        for name in ("name", "tool_call_id"):
            batch_op.alter_column(name, type_=sa.String(length=128), existing_type=sa.Text())
    with op.batch_alter_table("rounds") as batch_op:
        batch_op.drop_index("ix_rounds_pending")
        for name in ("task_id", "request_id", "trtc_round_id", "model"):
            batch_op.alter_column(name, type_=sa.String(length=128), existing_type=_ID)
        batch_op.drop_column("owner")
    with op.batch_alter_table("tasks") as batch_op:
        for name, old in (("id", 128), ("sdk_app_id", 64), ("user_id", 128), ("room_id", 128), ("room_id_type", 8)):
            batch_op.alter_column(name, type_=sa.String(length=old), existing_type=_ID)
    op.drop_table("instances")
