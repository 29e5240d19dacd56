"""Per-user memory: the user a task's memory belongs to, and each user's memory across tasks

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 22:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("summaries") as batch:
        batch.add_column(sa.Column("user_app", sa.String(length=256), nullable=True))
        batch.add_column(sa.Column("user_profile", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("user_id", sa.String(length=256), nullable=True))
        batch.add_column(sa.Column("user_memory", sa.Text(), nullable=True))
        batch.add_column(sa.Column("user_folded_seq", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("model", sa.String(length=256), nullable=True))
    op.create_index("ix_summaries_user", "summaries", ["user_app", "user_id"])
    op.create_table(
        "user_memories",
        sa.Column("sdk_app_id", sa.String(length=256), primary_key=True),
        sa.Column("profile", sa.String(length=64), primary_key=True),
        sa.Column("user_id", sa.String(length=256), primary_key=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_user_memories_updated_at", "user_memories", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_user_memories_updated_at", table_name="user_memories")
    op.drop_table("user_memories")
    op.drop_index("ix_summaries_user", table_name="summaries")
    with op.batch_alter_table("summaries") as batch:
        for column in ("model", "user_folded_seq", "user_memory", "user_id", "user_profile", "user_app"):
            batch.drop_column(column)
