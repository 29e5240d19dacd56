"""A task belongs to the profile that created it (with its X-Sdk-App-Id): requests of another
profile or app for the same task id are refused instead of sharing its history

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a task stored before this has no owner yet; its next round adopts it.
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.add_column(sa.Column("profile", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.drop_column("profile")
