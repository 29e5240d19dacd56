"""Rolling summaries: per task, the rounds that left the history window folded into one text

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 20:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "summaries",
        sa.Column("task_id", sa.String(length=256), sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("through_seq", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("stale", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("writer", sa.String(length=32), nullable=True),
        sa.Column("writer_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("summaries")
