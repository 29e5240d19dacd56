"""`Database.run` on SQLite: on the event loop while the write lock is free, on its own thread,
waiting for the lock, while another process holds it; WAL checkpoints on a thread of their own."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import uuid
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from core.db import Database


def _create(conn: Connection) -> None:
    conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")


def _insert(conn: Connection, x: int) -> int:
    conn.exec_driver_sql("INSERT INTO t (x) VALUES (?)", (x,))
    return threading.get_ident()


def _values(conn: Connection) -> list[int]:
    return [row[0] for row in conn.exec_driver_sql("SELECT x FROM t ORDER BY x")]


def _other_process_lock(path: Path) -> sqlite3.Connection:
    """A connection holding SQLite's write lock, as another worker process in a transaction does."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t (x) VALUES (100)")
    return other


def test_free_lock_runs_on_the_event_loop(tmp_path: Path) -> None:
    async def main() -> tuple[int, list[int]]:
        db = Database(f"sqlite:///{tmp_path / 'a.db'}")
        try:
            await db.run(_create)
            return await db.run(_insert, 1), await db.run(_values)
        finally:
            await db.dispose()

    ran_on, values = asyncio.run(main())
    assert ran_on == threading.get_ident()
    assert values == [1]


def test_held_lock_waits_on_the_thread_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "a.db"

    async def main() -> tuple[list[int], set[int], list[int]]:
        db = Database(f"sqlite:///{path}")
        try:
            await db.run(_create)
            other = _other_process_lock(path)
            first = asyncio.ensure_future(db.run(_insert, 1))
            second = asyncio.ensure_future(db.run(_insert, 2))
            await asyncio.sleep(0)  # both have tried the lock and queued
            waiting = [first.done(), second.done()]
            other.commit()
            other.close()
            threads = {await first, await second}
            return [int(w) for w in waiting], threads, await db.run(_values)
        finally:
            await db.dispose()

    waiting, threads, values = asyncio.run(main())
    assert waiting == [0, 0]
    assert threading.get_ident() not in threads
    assert values == [1, 2, 100]


def test_lock_held_past_the_busy_timeout_fails_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a.db"

    async def main() -> list[int]:
        db = Database(f"sqlite:///{path}")
        try:
            await db.run(_create)
            db._sqlite.BUSY_TIMEOUT_S = 0.05  # type: ignore[union-attr]
            other = _other_process_lock(path)
            with pytest.raises(OperationalError, match="locked"):
                await db.run(_insert, 1)
            other.rollback()
            other.close()
            return await db.run(_values)
        finally:
            await db.dispose()

    assert asyncio.run(main()) == []


def test_the_wal_is_checkpointed_off_the_serving_connection(tmp_path: Path) -> None:
    """The serving connection never checkpoints (the fsyncs would stall the event loop); the
    checkpointer's own connection and thread move the WAL into the database file every `EVERY`
    transactions."""
    path = tmp_path / "a.db"

    def main_file_rows() -> list[int] | None:
        # The database file alone, without its WAL: what checkpoints have moved into it.
        copy = tmp_path / f"copy-{uuid.uuid4().hex}.db"
        shutil.copyfile(path, copy)
        with closing(sqlite3.connect(copy)) as conn:
            try:
                return [row[0] for row in conn.execute("SELECT x FROM t ORDER BY x")]
            except sqlite3.OperationalError:
                return None  # not even the table yet

    async def main() -> tuple[int, list[int] | None, list[int] | None]:
        db = Database(f"sqlite:///{path}")
        try:
            checkpointer = db._sqlite.checkpointer  # type: ignore[union-attr]
            assert checkpointer is not None
            checkpointer.EVERY = 4
            await db.run(_create)
            autocheckpoint = await db.run(lambda conn: conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar())
            await db.run(_insert, 1)
            before = main_file_rows()
            await db.run(_insert, 2)  # the 4th transaction
            assert checkpointer.last is not None
            await asyncio.wrap_future(checkpointer.last)
            return autocheckpoint, before, main_file_rows()
        finally:
            await db.dispose()

    assert asyncio.run(main()) == (0, None, [1, 2])


def _create_blobs(conn: Connection) -> None:
    conn.exec_driver_sql("CREATE TABLE b (id INTEGER PRIMARY KEY, v BLOB)")


def _write_blob(conn: Connection, n: int) -> None:
    """What a round does to the WAL, roughly: a few pages written, some of them over again."""
    conn.exec_driver_sql("INSERT INTO b (id, v) VALUES (?, randomblob(3000))", (n,))
    conn.exec_driver_sql("UPDATE b SET v = randomblob(3000) WHERE id = ?", (n // 2,))


def _largest_wal(path: Path, wal_max_mb: int, writes: int) -> int:
    """The WAL's largest size over `writes` transactions that never pause."""

    async def main() -> int:
        db = Database(f"sqlite:///{path}", wal_max_mb=wal_max_mb)
        try:
            checkpointer = db._sqlite.checkpointer  # type: ignore[union-attr]
            assert checkpointer is not None
            checkpointer.EVERY = 50
            await db.run(_create_blobs)
            largest = 0
            for n in range(writes):
                await db.run(_write_blob, n)
                largest = max(largest, Path(f"{path}-wal").stat().st_size)
            return largest
        finally:
            await db.dispose()

    return asyncio.run(main())


def test_the_wal_stays_bounded_under_writes_that_never_pause(tmp_path: Path) -> None:
    """Passive checkpoints alone never catch up with writers that never pause, and the WAL only
    grows (the baseline, `wal_max_mb=0`); with a bound it is emptied whenever it passes it."""
    mb = 1024 * 1024
    assert _largest_wal(tmp_path / "unbounded.db", 0, 2500) > 8 * mb
    assert _largest_wal(tmp_path / "bounded.db", 1, 2500) < 3 * mb
