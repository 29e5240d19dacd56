"""Knowledge bases: bases, documents, chunks; the passages each round used

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 20:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "knowledge_bases",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("documents", sa.Integer(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("embedding_model", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "knowledge_documents",
        sa.Column("base", sa.String(length=64), primary_key=True),
        sa.Column("id", sa.String(length=128), primary_key=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("content_type", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("chars", sa.Integer(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["base"], ["knowledge_bases.name"], ondelete="CASCADE"),
    )
    op.create_table(
        "knowledge_chunks",
        sa.Column("base", sa.String(length=64), primary_key=True),
        sa.Column("document", sa.String(length=128), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("heading", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["base", "document"], ["knowledge_documents.base", "knowledge_documents.id"], ondelete="CASCADE"
        ),
    )
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("knowledge", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("knowledge")
    op.drop_table("knowledge_chunks")
    op.drop_table("knowledge_documents")
    op.drop_table("knowledge_bases")
