"""The database: one `Database` per process, opened in the app's lifespan.

`await db.run(fn, *args)` runs the plain function `fn(conn, *args)` in one transaction that
commits when it returns; it is the one way this code talks to the database. Store code is thus
ordinary synchronous SQLAlchemy Core, and each dialect runs it the cheapest way:

- SQLite: the whole transaction is one job on the database's own thread, with the standard
  `sqlite3` driver. aiosqlite hops between threads about four times per statement (an empty
  transaction cost 1.1 ms of CPU, the proxy's largest cost). The single thread also queues this
  process's transactions: SQLite has one writer, and two transactions that collide in SQLite
  itself wait in its busy handler, which sleeps in steps of up to 100 ms. The URL may name
  `sqlite+aiosqlite` or plain `sqlite`; both mean this.
- PostgreSQL: asyncpg, with the function run through SQLAlchemy's greenlet bridge (`run_sync`),
  on the event loop. A URL without a driver (`postgresql://`) means asyncpg.

Connections go back to the pool without the pool's extra rollback: every transaction here ends
itself (commit, or rollback on error). SQLite gets WAL, a busy timeout (other processes) and
`BEGIN IMMEDIATE`: a deferred transaction that upgrades from read to write fails at once with
SQLITE_BUSY when another process wrote in between, whatever the busy timeout says.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Concatenate, ParamSpec, TypeVar

import sqlalchemy
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Connection, Engine, URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

P = ParamSpec("P")
T = TypeVar("T")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self._sqlite: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._async: AsyncEngine | None = None
        if self.dialect == "sqlite":
            self._sqlite = _sqlite_engine(parsed)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        else:
            if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg2":
                parsed = parsed.set(drivername="postgresql+asyncpg")
            self._async = create_async_engine(
                parsed, pool_size=pool_size, max_overflow=max_overflow, pool_reset_on_return=None
            )

    async def run(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(conn, *args, **kwargs)` in one transaction. On SQLite the transaction runs to
        its end even if the awaiting task is cancelled (the thread cannot be stopped midway);
        callers that must know its outcome shield it."""
        if self._thread is not None:
            job = functools.partial(self._run_sqlite, fn, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._thread, job)
        assert self._async is not None
        async with self._async.begin() as conn:
            return await conn.run_sync(fn, *args, **kwargs)

    def _run_sqlite(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._sqlite is not None
        with self._sqlite.begin() as conn:
            return fn(conn, *args, **kwargs)

    async def dispose(self) -> None:
        if self._thread is not None and self._sqlite is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._sqlite.dispose)
            self._thread.shutdown()
        if self._async is not None:
            await self._async.dispose()


def _sqlite_engine(url: URL) -> Engine:
    url = url.set(drivername="sqlite")
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(
        url,
        pool_size=1,
        max_overflow=0,
        pool_reset_on_return=None,
        # One thread uses the connection; `dispose` may close it from another.
        connect_args={"timeout": 30, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's `begin` event issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
