"""Deleting stored conversations: on request (the admin API) and by age (`RETENTION_DAYS`).

A task is deleted in one statement on its row: its rounds, their messages and its failed
requests go with it by cascade (both databases enforce the foreign keys), and its callback events
(not tied by a key: they may come before the task does) are deleted beside it. Each process also
keeps copies of recent history and of what memory gives each task (`HistoryCache`,
`memory.keeper.Keeper`); a deletion leaves a notice in `deletions`, which every process reads
every `NOTICE_POLL_S` and drops its copies of those tasks.
Correctness does not wait for that: a task made again under a deleted id starts with a new random
`edits`, so no old copy ever matches it, and its first round starts empty.

Retention runs off the request path, in small batches with a pause between them, so a purge of a
large backlog never holds the database's write lock (SQLite) or many row locks (PostgreSQL) for
long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

from sqlalchemy import delete, func, insert, or_, select
from sqlalchemy.engine import Connection

from admin.models import Deletion
from core.db import Database
from llm_proxy.models import Task
from llm_proxy.recovery import oldest_live_instance
from memory import store as memory_store
from memory.models import Summary
from orchestrator.models import CallbackEvent

log = logging.getLogger("trtc.admin")

# How often each process reads new deletion notices, how long it waits for a notice whose id was
# skipped (see `NoticeCursor`), and how long a notice is kept.
NOTICE_POLL_S = 2.0
NOTICE_GAP_S = 30.0
NOTICE_KEEP_S = 600.0
# Tasks per purge transaction: it starts at PURGE_BATCH and is scaled after each transaction so
# the next takes about PURGE_TARGET_S (a task may hold many rounds, and a busy database makes
# every statement slower), between 1 and PURGE_BATCH_MAX. Between two transactions the purge
# waits at least PURGE_PAUSE_S and nine times the last one's duration, so it takes at most a tenth
# of the database's time, and a live round's claim queues behind at most one short transaction;
# but never more than PURGE_PAUSE_MAX_S (a transaction that waited long for a lock says nothing
# about the next one).
PURGE_BATCH = 10
PURGE_BATCH_MAX = 50
PURGE_TARGET_S = 0.004
PURGE_PAUSE_S = 0.05
PURGE_PAUSE_MAX_S = 1.0
# The chore a process with retention on announces with its lease (`Instance.chores`).
RETENTION = "retention"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _delete_where(conn: Connection, *where: Any) -> list[str]:
    """Delete the tasks matching `where` (their rounds, messages and failed requests by cascade)
    and leave a notice of each for the other processes; returns their ids."""
    gone = list(conn.execute(delete(Task).where(*where).returning(Task.id)).scalars())
    if gone:
        now = _now()
        conn.execute(insert(Deletion), [{"task_id": task_id, "deleted_at": now} for task_id in gone])
    return gone


def delete_tasks(conn: Connection, task_ids: Sequence[str]) -> list[str]:
    """Delete these tasks with everything stored for them (also the callback events of an id
    whose task was never stored); returns the ids that existed."""
    if not task_ids:
        return []
    gone = _delete_where(conn, Task.id.in_(task_ids))
    conn.execute(delete(CallbackEvent).where(CallbackEvent.task_id.in_(task_ids)))
    return gone


def user_task_ids(conn: Connection, sdk_app_id: str, user_id: str, limit: int) -> list[str]:
    """The user's tasks: those they started (X-User-Id), and those whose memory is theirs (the
    memory's user id may be a MetaInfo field)."""
    theirs = select(Summary.task_id).where(Summary.user_app == sdk_app_id, Summary.user_id == user_id)
    return list(
        conn.execute(
            select(Task.id).where(
                or_(Task.id.in_(theirs), (Task.sdk_app_id == sdk_app_id) & (Task.user_id == user_id))
            ).limit(limit)
        ).scalars()
    )


def expired_task_ids(conn: Connection, cutoff: datetime, limit: int) -> list[str]:
    return list(
        conn.execute(select(Task.id).where(Task.updated_at < cutoff).order_by(Task.updated_at).limit(limit)).scalars()
    )


def purge_expired(conn: Connection, cutoff: datetime, limit: int) -> list[str]:
    """One batch of retention: tasks last active before `cutoff` (checked again in the delete,
    so a task a round just touched stays), and callback events older than it whose task this
    server never stored."""
    candidates = expired_task_ids(conn, cutoff, limit)
    gone = _delete_where(conn, Task.id.in_(candidates), Task.updated_at < cutoff) if candidates else []
    if gone:
        conn.execute(delete(CallbackEvent).where(CallbackEvent.task_id.in_(gone)))
    stray = select(CallbackEvent.id).where(
        CallbackEvent.received_at < cutoff,
        ~select(Task.id).where(Task.id == CallbackEvent.task_id).exists(),
    ).limit(limit)
    conn.execute(delete(CallbackEvent).where(CallbackEvent.id.in_(stray.scalar_subquery())))
    return gone


def notices_after(conn: Connection, after_id: int) -> list[tuple[int, str]]:
    rows = conn.execute(select(Deletion.id, Deletion.task_id).where(Deletion.id > after_id).order_by(Deletion.id))
    return [(row.id, row.task_id) for row in rows]


def last_notice(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(Deletion.id), 0))).scalar_one())


class NoticeCursor:
    """Which deletion notices a process has read, by id. Ids are handed out at insert, so two
    deletes in flight may commit out of order: a notice above a missing id is handled at once,
    but reading goes on from the missing id (the frontier) until it shows up, or for at most
    `NOTICE_GAP_S` (then it was a rolled-back delete; PostgreSQL sequences leave such gaps)."""

    def __init__(self, frontier: int) -> None:
        self.frontier = frontier
        self._handled: set[int] = set()
        self._gap_since: float | None = None

    def take(self, notices: list[tuple[int, str]], now: float) -> list[str]:
        """The task ids of notices not handled before; moves the frontier."""
        fresh = [task_id for notice_id, task_id in notices if notice_id not in self._handled]
        self._handled.update(notice_id for notice_id, _task_id in notices)
        while self.frontier + 1 in self._handled:
            self.frontier += 1
        if self._handled and max(self._handled) > self.frontier:
            if self._gap_since is None:
                self._gap_since = now
            elif now - self._gap_since > NOTICE_GAP_S:
                self.frontier, self._gap_since = max(self._handled), None
        else:
            self._gap_since = None
        self._handled = {notice_id for notice_id in self._handled if notice_id > self.frontier}
        return fresh


def forget_notices(conn: Connection, older_than: datetime) -> None:
    conn.execute(delete(Deletion).where(Deletion.deleted_at < older_than))


class Lifecycle:
    """This process's part: deletes on request, drops copies of tasks deleted anywhere, and
    (with `retention_days`) purges by age every `retention_interval_s`."""

    def __init__(
        self, db: Database, forget: Sequence[Callable[[str], None]], retention_days: float | None,
        retention_interval_s: float, instance_id: str | None = None,
    ) -> None:
        self._db = db
        # This process's lease (`recovery.Lease`): only the oldest live process purges.
        self._instance_id = instance_id
        # What drops this process's copies of a deleted task.
        self._forget = forget
        self._retention_days = retention_days
        self._interval_s = retention_interval_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow_notices(), name="deletion-notices"),
            asyncio.create_task(self._purge_forever(), name="retention"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def delete_tasks(self, task_ids: Sequence[str]) -> list[str]:
        gone = await self._db.run(delete_tasks, task_ids)
        self._drop(gone)
        return gone

    async def delete_user(self, sdk_app_id: str, user_id: str) -> tuple[list[str], int]:
        """Every task of the user, in batches (a user may have thousands), then their memory in
        every profile; the tasks deleted and how many memories. Tasks go first: a fold of one
        of them into the memory then finds its task gone and writes nothing."""
        gone: list[str] = []
        while batch := await self._db.run(user_task_ids, sdk_app_id, user_id, PURGE_BATCH):
            gone += await self.delete_tasks(batch)
        return gone, await self._db.run(memory_store.delete_memories, sdk_app_id, user_id)

    def _drop(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            for forget in self._forget:
                forget(task_id)

    async def purge(self) -> int:
        """Run retention to the end, batch by batch; returns how many tasks went. Only one
        process of a deployment does it (the oldest live one): several purging at once would
        only queue behind each other's locks, and behind them the live rounds."""
        if self._retention_days is None:
            return 0
        if self._instance_id is not None and await self._db.run(oldest_live_instance, RETENTION) != self._instance_id:
            return 0
        cutoff = _now() - timedelta(days=self._retention_days)
        purged = 0
        batch = PURGE_BATCH
        while True:
            started = time.perf_counter()
            gone = await self._db.run(purge_expired, cutoff, batch)
            memories = await self._db.run(memory_store.purge_memories, cutoff, batch)
            took = time.perf_counter() - started
            self._drop(gone)
            purged += len(gone)
            if len(gone) < batch and memories < batch:
                break
            batch = max(1, min(PURGE_BATCH_MAX, round(batch * PURGE_TARGET_S / max(took, 1e-4))))
            await asyncio.sleep(min(PURGE_PAUSE_MAX_S, max(PURGE_PAUSE_S, 9 * took)))
        if purged:
            log.info("retention: deleted %d task(s) last active before %s", purged, cutoff.isoformat())
        return purged

    async def _follow_notices(self) -> None:
        cursor: NoticeCursor | None = None
        while True:
            try:
                if cursor is None:
                    # A new process holds no copies yet: only notices from now on concern it.
                    cursor = NoticeCursor(await self._db.run(last_notice))
                self._drop(cursor.take(await self._db.run(notices_after, cursor.frontier), time.monotonic()))
            except Exception as exc:  # the database is down: try again next time
                log.warning("could not read deletion notices: %s", exc)
            await asyncio.sleep(NOTICE_POLL_S)

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge()
                await self._db.run(forget_notices, _now() - timedelta(seconds=NOTICE_KEEP_S))
            except Exception as exc:  # the database is down: try again next time
                log.warning("retention failed: %s", exc)
            await asyncio.sleep(self._interval_s)
