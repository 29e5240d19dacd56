"""Alembic environment: runs migrations through the `Database` the app itself uses."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

import llm_proxy.models  # noqa: F401  (registers the tables on Base.metadata)
from app.db import Base, Database, is_sqlite

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite(config.attributes["database_url"]),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    db = Database(config.attributes["database_url"], pool_size=1, max_overflow=0)
    try:
        await db.run(_run)
    finally:
        await db.dispose()


asyncio.run(_run_online())
