"""Alembic environment: runs migrations through the `Database` the app itself uses."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

import llm_proxy.models  # noqa: F401  (registers the tables on Base.metadata)
import orchestrator.models  # noqa: F401
import admin.models  # noqa: F401
import memory.models  # noqa: F401
import knowledge.models  # noqa: F401
from core.db import Base, Database, database_url, is_sqlite, sqlite_engine

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


def _run_sqlite() -> None:
    """SQLite alters a table by copying it (batch mode) and dropping the old one; with foreign
    keys on, dropping `tasks` would delete every round and message by cascade. So they are off
    while the migration runs (which only a connection outside a transaction can do), and checked
    afterwards."""
    engine = sqlite_engine(database_url(config.attributes["database_url"]))
    try:
        with engine.connect() as connection:
            raw = connection.connection.driver_connection
            assert raw is not None
            raw.execute("PRAGMA foreign_keys=OFF")
            _run(connection)
            broken = raw.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
    finally:
        engine.dispose()


if is_sqlite(config.attributes["database_url"]):
    _run_sqlite()
else:
    asyncio.run(_run_online())
