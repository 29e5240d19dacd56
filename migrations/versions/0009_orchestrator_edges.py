"""The orchestrator's edges: a 903/905 that comes while its round is still open waits for it
(the event is held, `held_since`, and the round marked, `held`, so that storing the round applies
the event); a round keeps the request's fields that are no OpenAI parameter (`extra_fields`,
the orchestrator's MetaInfo); a task stopped by the orchestrator (event 902) keeps when and its
`LeaveCode`

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 19:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.add_column(sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("leave_code", sa.Integer(), nullable=True))
    with op.batch_alter_table("rounds") as batch_op:
        batch_op.add_column(sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("extra_fields", sa.JSON(), nullable=True))
    with op.batch_alter_table("callback_events") as batch_op:
        batch_op.add_column(sa.Column("held_since", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_callback_events_held",
        "callback_events",
        ["task_id"],
        postgresql_where=sa.text("held_since IS NOT NULL"),
        sqlite_where=sa.text("held_since IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_callback_events_held", table_name="callback_events")
    with op.batch_alter_table("callback_events") as batch_op:
        batch_op.drop_column("held_since")
    with op.batch_alter_table("rounds") as batch_op:
        batch_op.drop_column("extra_fields")
        batch_op.drop_column("held")
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.drop_column("leave_code")
        batch_op.drop_column("ended_at")
