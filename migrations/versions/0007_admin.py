"""What the admin API and retention need: per-round times and errors, failed requests, deletion
notices, the chores a process runs, and indexes for listing, per-user deletes and purging by age

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch_op:
        batch_op.add_column(sa.Column("first_token_ms", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("total_ms", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("error", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_rounds_created_at", ["created_at"], unique=False)
    with op.batch_alter_table("instances") as batch_op:
        batch_op.add_column(sa.Column("chores", sa.String(length=64), nullable=True))
    op.create_index("ix_tasks_updated_at", "tasks", ["updated_at", "id"])
    op.create_index("ix_tasks_user", "tasks", ["sdk_app_id", "user_id"])
    op.create_index("ix_callback_events_received_at", "callback_events", ["received_at"])
    op.create_table(
        "failed_requests",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=256), nullable=False),
        sa.Column("request_id", sa.String(length=256), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_failed_requests_task", "failed_requests", ["task_id"])
    op.create_index("ix_failed_requests_occurred_at", "failed_requests", ["occurred_at"])
    op.create_table(
        "deletions",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=256), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_deletions_deleted_at", "deletions", ["deleted_at"])


def downgrade() -> None:
    op.drop_index("ix_deletions_deleted_at", table_name="deletions")
    op.drop_table("deletions")
    op.drop_index("ix_failed_requests_occurred_at", table_name="failed_requests")
    op.drop_index("ix_failed_requests_task", table_name="failed_requests")
    op.drop_table("failed_requests")
    op.drop_index("ix_callback_events_received_at", table_name="callback_events")
    op.drop_index("ix_tasks_user", table_name="tasks")
    op.drop_index("ix_tasks_updated_at", table_name="tasks")
    with op.batch_alter_table("instances") as batch_op:
        batch_op.drop_column("chores")
    with op.batch_alter_table("rounds") as batch_op:
        batch_op.drop_index("ix_rounds_created_at")
        batch_op.drop_column("error")
        batch_op.drop_column("total_ms")
        batch_op.drop_column("first_token_ms")
