"""The database: one `Database` per process, opened in the app's lifespan.

`await db.run(fn, *args)` runs the plain function `fn(conn, *args)` in one transaction that
commits when it returns; it is the one way this code talks to the database. Store code is thus
ordinary synchronous SQLAlchemy Core, and each dialect runs it the cheapest way:

- SQLite: the standard `sqlite3` driver, one connection. A transaction runs right on the event
  loop when it can: a claim is a few hundred microseconds of work, less than handing it to a
  thread and back costs (a thread hop added 0.5 ms to every round's first token). When another
  process holds SQLite's write lock, or a transaction already waits, it goes to the database's
  own thread instead, which queues this process's transactions and retries the lock every
  fraction of a millisecond (SQLite's own busy handler sleeps in steps of up to 100 ms, which
  two worker processes sharing one file hit all the time). The URL may name `sqlite+aiosqlite`
  or plain `sqlite`; both mean this.
- PostgreSQL: asyncpg, with the function run through SQLAlchemy's greenlet bridge (`run_sync`),
  on the event loop. A URL without a driver (`postgresql://`, `postgres://`) means asyncpg. A
  transaction that meets a connection the server dropped is run again on a new one.

PostgreSQL connections go back to the pool without the pool's extra rollback: every transaction
here ends itself (commit, or rollback on error). SQLite gets WAL and `BEGIN IMMEDIATE`, so a transaction
takes the write lock before it does anything, and a busy database is only ever met at its start
(a deferred transaction that upgrades from read to write fails midway when another process wrote
in between). Its WAL is moved into the database file by `_Checkpointer`, off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Callable, Concatenate, ParamSpec, TypeVar

import sqlalchemy
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Connection, Engine, URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_SQLITE_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
log = logging.getLogger("trtc.db")
P = ParamSpec("P")
T = TypeVar("T")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def database_url(url: str) -> URL:
    """The URL as this code connects to it: every PostgreSQL spelling (`postgresql://`,
    `postgres://`, a psycopg driver) means asyncpg, the only PostgreSQL driver installed; every
    SQLite one means the standard `sqlite3` driver."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        return parsed.set(drivername="postgresql+asyncpg")
    if backend == "sqlite":
        return parsed.set(drivername="sqlite")
    return parsed


def is_sqlite(url: str) -> bool:
    return database_url(url).get_backend_name() == "sqlite"


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20, wal_max_mb: int = 64) -> None:
        """`wal_max_mb`: SQLite's WAL is emptied whenever it grows past this (0: never forced)."""
        parsed = database_url(url)
        self.dialect = parsed.get_backend_name()
        self._sqlite: _Sqlite | None = None
        self._async: AsyncEngine | None = None
        self._autocommit: AsyncEngine | None = None
        if self.dialect == "sqlite":
            self._sqlite = _Sqlite(sqlite_engine(parsed, wal_max_mb), wal_max_mb)
        else:
            self._async = create_async_engine(
                parsed, pool_size=pool_size, max_overflow=max_overflow, pool_reset_on_return=None
            )
            # The same pool; on asyncpg switching a connection to autocommit costs no round trip.
            self._autocommit = self._async.execution_options(isolation_level="AUTOCOMMIT")

    def run(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Run `fn(conn, *args, **kwargs)` in one transaction; await the returned future for its
        result. When SQLite ran it on the spot the future is already done, and awaiting it costs
        no turn of the event loop. The transaction runs to its end even if the awaiting task is
        cancelled on SQLite (the thread cannot be stopped midway), not so on PostgreSQL: callers
        that must know its outcome shield it."""
        if self._sqlite is not None:
            return self._sqlite.run(functools.partial(fn, **kwargs), *args)
        return asyncio.ensure_future(self._run_async(fn, *args, **kwargs))

    def run_in_background(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[T]:
        """Like `run`, for work nobody is waiting on (memory's folds): on SQLite never on the event
        loop but on the database thread, so a transaction of a few ms stalls no stream in flight
        (transactions that come meanwhile queue behind it there, in order, rather than the loop
        stopping for it)."""
        if self._sqlite is not None:
            return self._sqlite.run(functools.partial(fn, **kwargs), *args, on_loop=False)
        return self.run(fn, *args, **kwargs)

    def run_autocommit(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[T]:
        """Like `run`, but on PostgreSQL each statement commits on its own: for work whose only
        write is a single statement, a transaction adds nothing but two round trips (BEGIN and
        COMMIT). SQLite runs `fn` in a transaction, as `run` does; there it costs nothing."""
        if self._sqlite is not None:
            return self._sqlite.run(functools.partial(fn, **kwargs), *args)
        return asyncio.ensure_future(self._run_autocommit(fn, *args, **kwargs))

    async def _run_async(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._async is not None
        return await _run_retrying(self._async.begin, fn, args, kwargs)

    async def _run_autocommit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._autocommit is not None
        return await _run_retrying(self._autocommit.connect, fn, args, kwargs)

    async def dispose(self) -> None:
        if self._sqlite is not None:
            await self._sqlite.dispose()
        if self._async is not None:
            await self._async.dispose()


# A pooled connection found dead (the server restarted, a failover, `pg_terminate_backend`) is
# retried on a new one. SQLAlchemy then also retires every connection pooled before it, so one
# failure clears the whole pool; this costs nothing on the hot path, where a pre-ping would cost a
# round trip per transaction.
_ATTEMPTS = 3


async def _run_retrying(
    connect: Callable[[], AbstractAsyncContextManager[AsyncConnection]],
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    for attempt in range(_ATTEMPTS):
        try:
            async with connect() as conn:
                return await conn.run_sync(fn, *args, **kwargs)
        except DBAPIError as exc:
            if not exc.connection_invalidated or attempt == _ATTEMPTS - 1:
                raise
            log.warning("database connection lost (%s); retrying on a new connection", exc.orig)
    raise AssertionError("unreachable")


class _Busy(Exception):
    """Another process holds SQLite's write lock; nothing of the transaction ran."""


class _Sqlite:
    """Transactions on one SQLite connection: on the event loop when the lock is free and no
    transaction waits, else queued on one thread that waits for the lock."""

    BUSY_TIMEOUT_S = 30.0
    # How long the TRUNCATE checkpoint (`_truncate_wal`) waits for other processes' writers.
    TRUNCATE_WAIT_MS = 2000

    def __init__(self, engine: Engine, wal_max_mb: int) -> None:
        self._engine = engine
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._queued = 0
        path = _sqlite_file(engine.url)
        self.checkpointer = _Checkpointer(path, wal_max_mb) if path else None
        # Kept open between transactions, which spares each one a pool checkout and return;
        # closed after a failure, so the next transaction starts on a fresh connection.
        self._conn: Connection | None = None

    def run(self, fn: Callable[..., T], *args: Any, on_loop: bool = True) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        if self.checkpointer is not None and self.checkpointer.wants_truncate:
            # Queued ahead of this transaction and those that follow it: they wait the few ms it
            # takes on the database thread, and the checkpoint does not race them for the lock.
            self.checkpointer.wants_truncate = False
            self._queued += 1
            loop.run_in_executor(self._thread, self._truncate_wal, loop)
        if on_loop and self._queued == 0:
            done: asyncio.Future[T] = loop.create_future()
            try:
                done.set_result(self._transaction(fn, args))
                return done
            except _Busy:
                pass
            except Exception as exc:
                done.set_exception(exc)
                return done
        # Counted down by the loop once the thread let go of the connection (a cancelled
        # future is done before that).
        self._queued += 1
        return loop.run_in_executor(self._thread, self._wait_for_lock, loop, fn, args)

    def _wait_for_lock(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            deadline = time.monotonic() + self.BUSY_TIMEOUT_S
            pause = 0.0002
            while True:
                try:
                    return self._transaction(fn, args)
                except _Busy as busy:
                    if time.monotonic() > deadline:
                        raise busy.__cause__ from None  # type: ignore[misc]
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
        finally:
            loop.call_soon_threadsafe(self._dequeue)

    def _dequeue(self) -> None:
        self._queued -= 1

    def _truncate_wal(self, loop: asyncio.AbstractEventLoop) -> None:
        """A TRUNCATE checkpoint on the serving connection (outside any transaction): copies what
        the last passive checkpoint left, syncs, and empties the WAL. It waits up to `TRUNCATE_WAIT_MS` for
        other processes' writers; this process's wait behind it on this thread."""
        try:
            if self._conn is None:
                self._conn = self._engine.connect()
            raw = self._conn.connection.dbapi_connection
            assert raw is not None
            raw.execute(f"PRAGMA busy_timeout={self.TRUNCATE_WAIT_MS}")
            try:
                busy = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                raw.execute("PRAGMA busy_timeout=0")
            if busy:
                log.warning("SQLite's WAL is over its bound and other processes kept it busy for %d ms; tried again later",
                            self.TRUNCATE_WAIT_MS)
        except sqlite3.Error as exc:
            log.warning("SQLite checkpoint failed: %s", exc)
            self._close()
        finally:
            loop.call_soon_threadsafe(self._dequeue)

    def _transaction(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._conn is None:
            self._conn = self._engine.connect()
        conn = self._conn
        try:
            transaction = conn.begin()
        except OperationalError as exc:
            if getattr(exc.orig, "sqlite_errorcode", 0) & 0xFF in _SQLITE_BUSY:
                raise _Busy() from exc
            self._close()
            raise
        try:
            with transaction:
                result = fn(conn, *args)
        except BaseException:
            self._close()
            raise
        if self.checkpointer is not None:
            self.checkpointer.transaction_done()
        return result

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def dispose(self) -> None:
        def close() -> None:
            self._close()
            self._engine.dispose()

        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown()
        if self.checkpointer is not None:
            await asyncio.wrap_future(self.checkpointer.close())


class _Checkpointer:
    """Moves SQLite's WAL into the database file from a connection and thread of its own, and keeps
    the WAL file from growing past `wal_max_mb`.

    SQLite's automatic checkpoint runs inside whichever commit takes the WAL past 1000 pages, and
    its fsyncs (8-10 ms on the 2-core test VM, more on a busy disk) then stall the event loop and
    every round in flight: a p99 of the proxy made on purpose. A PASSIVE checkpoint neither takes
    nor waits for the write lock, so commits go on while it runs. The serving connection has
    `wal_autocheckpoint=0` (see `sqlite_engine`); every `EVERY` transactions one checkpoint is
    started here unless one still runs. Each worker process has its own; SQLite lets one run at a
    time and the others return at once.

    A passive checkpoint alone never lets the WAL start over under sustained writes: SQLite
    rewinds the WAL only when a writer begins while every frame in it has been copied, and with
    writes arriving all the time some always came after the checkpoint's snapshot (the file reached
    1.65 GB that way). So when a passive checkpoint leaves a WAL larger than `wal_max_mb`, a
    TRUNCATE checkpoint follows (`_Sqlite._truncate_wal`), queued on the database thread ahead of
    this process's next transactions: it copies the few frames written since the passive one, syncs,
    and empties the file, while those transactions wait a few ms there (not on the event loop).
    Raced against the writers from another thread instead, it lost for seconds at a time and the
    WAL kept growing. `journal_size_limit` trims the file to the same size whenever SQLite rewinds
    it on its own."""

    EVERY = 200

    def __init__(self, path: str, wal_max_mb: int) -> None:
        self._path = path
        self._wal_max_bytes = wal_max_mb * 1024 * 1024
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._conn: sqlite3.Connection | None = None
        self._since = 0
        self.last: Future[None] | None = None
        # Set here once a passive checkpoint left the WAL over its bound; `_Sqlite` queues the
        # TRUNCATE checkpoint ahead of its next transaction.
        self.wants_truncate = False

    def transaction_done(self) -> None:
        self._since += 1
        if self._since >= self.EVERY and (self.last is None or self.last.done()):
            self._since = 0
            self.last = self._thread.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            if self._wal_max_bytes and _file_size(self._path + "-wal") > self._wal_max_bytes:
                self.wants_truncate = True
        except sqlite3.Error as exc:
            # Harmless: the WAL only grows until a later checkpoint gets through.
            log.warning("SQLite checkpoint failed: %s", exc)

    def close(self) -> Future[None]:
        """Close the connection after a checkpoint still running; the returned future says when."""

        def close() -> None:
            if self._conn is not None:
                self._conn.close()

        closed = self._thread.submit(close)
        self._thread.shutdown(wait=False)
        return closed


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _sqlite_file(url: URL) -> str | None:
    """The database file of a SQLite URL; None for an in-memory database."""
    return url.database if url.database and url.database != ":memory:" else None


def sqlite_engine(url: URL, wal_max_mb: int = 64) -> Engine:
    url = url.set(drivername="sqlite")
    path = _sqlite_file(url)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(
        url,
        pool_size=1,
        max_overflow=0,
        pool_reset_on_return=None,
        # The event loop and the database thread take turns with the one connection.
        # No busy timeout: `_Sqlite` waits for the lock itself.
        connect_args={"timeout": 0, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's `begin` event issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA wal_autocheckpoint=0")  # `_Checkpointer` does it off the loop
        if wal_max_mb:
            cursor.execute(f"PRAGMA journal_size_limit={wal_max_mb * 1024 * 1024}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
