"""Rounds whose process died: found by leases, settled once, never waited on again.

Every server process is an `Instance` with a lease in the database, renewed every quarter of
`INSTANCE_LEASE_S` by `Lease`; each round it claims names it as `owner`. A pending round whose
owner's lease has run out (or whose owner row is gone) belongs to a dead process. A process on the
same machine does not even wait for the lease: the owner's recorded pid, start time, boot id and
pid namespace tell it at once that the process is gone (`local_process_gone`), which is what makes
a `kill -9` and restart cost the next round nothing.

Whoever meets such a round first settles it (`settle`): marked interrupted with an empty reply,
its user turn kept (the claim stored it). Rounds are met when a new round of the task waits for
earlier pending ones (`ChatService._wait_for`), and by a sweep over all pending rounds that each
process runs at start-up and every few seconds, so none is left pending for long. The lease
times are read from the database's clock, which every replica shares.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from sqlalchemy import and_, bindparam, delete, func, insert, literal, literal_column, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from core.db import Database
from llm_proxy.models import ROUND_INTERRUPTED, ROUND_PENDING, Instance, Message, Round, Task

log = logging.getLogger("trtc.recovery")

# Sweeps for dead rounds every this many renewals; forgets instances expired this long ago.
_SWEEP_EVERY = 10
_FORGET_AFTER_S = 3600.0


def _db_now(dialect: str) -> Any:
    """Seconds since the epoch by the database's clock, as SQL."""
    if dialect == "postgresql":
        return func.extract("epoch", func.clock_timestamp())
    return (func.julianday("now") - 2440587.5) * 86400.0


# -- this process ------------------------------------------------------------------------------


def process_identity() -> str | None:
    """`boot id:pid namespace:pid:start time` of this process (Linux), or None elsewhere."""
    return _identity_of(os.getpid())


def _identity_of(pid: int) -> str | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        started = _start_time(pid)
    except OSError:
        return None
    if started is None:
        return None
    return f"{boot}:{namespace}:{pid}:{started}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after it do not.
    return stat.rpartition(")")[2].split()[19]


def local_process_gone(identity: str | None, mine: str | None) -> bool:
    """True when `identity` names a process this one (`mine`) could see (same boot, same pid
    namespace) and that process no longer runs. False when it runs, or when this one cannot tell."""
    if identity is None or mine is None:
        return False
    boot, namespace, pid, started = identity.split(":")
    my_boot, my_namespace, _pid, _started = mine.split(":")
    if (boot, namespace) != (my_boot, my_namespace):
        return False
    return _start_time(int(pid)) != started


# -- SQL ---------------------------------------------------------------------------------------


@cache
def _renew_statement(dialect: str) -> Any:
    insert = (postgresql if dialect == "postgresql" else sqlite).insert(Instance)
    expires = _db_now(dialect) + bindparam("lease_s")
    return insert.values(
        id=bindparam("id"), process=bindparam("process"), lease_expires=expires, started_at=bindparam("started_at"),
        chores=bindparam("chores", type_=Instance.chores.type),
    ).on_conflict_do_update(index_elements=[Instance.id], set_={"lease_expires": expires})


def renew_lease(conn: Connection, instance_id: str, process: str | None, lease_s: float, chores: str | None = None) -> None:
    conn.execute(
        _renew_statement(conn.dialect.name),
        {"id": instance_id, "process": process, "lease_s": lease_s, "started_at": datetime.now(timezone.utc),
         "chores": chores},
    )


def oldest_live_instance(conn: Connection, chore: str) -> str | None:
    """The longest-running process with this chore whose lease holds: the one that does it, so
    replicas and workers do not contend for the same rows."""
    return conn.execute(
        select(Instance.id)
        .where(Instance.lease_expires > _db_now(conn.dialect.name), Instance.chores == chore)
        .order_by(Instance.started_at, Instance.id)
        .limit(1)
    ).scalar_one_or_none()


def drop_lease(conn: Connection, instance_id: str) -> None:
    conn.execute(delete(Instance).where(Instance.id == instance_id))


@dataclass(frozen=True)
class PendingRound:
    id: str
    task_id: str
    owner: str | None
    # The owner's process identity; whether its lease has run out (or its row is gone).
    process: str | None
    expired: bool


def pending_rounds(conn: Connection, round_ids: Sequence[str] | None = None) -> list[PendingRound]:
    """The given rounds (or all rounds) still pending, with what is known of their owners."""
    expired = or_(Instance.id.is_(None), Instance.lease_expires < _db_now(conn.dialect.name))
    query = (
        select(Round.id, Round.task_id, Round.owner, Instance.process, expired)
        .outerjoin(Instance, Instance.id == Round.owner)
        # Spelled out, not a parameter: only then can both databases use the partial index.
        .where(Round.status == literal_column(f"'{ROUND_PENDING}'"))
    )
    if round_ids is not None:
        query = query.where(Round.id.in_(list(round_ids)))
    return [PendingRound(*row) for row in conn.execute(query)]


def settle(conn: Connection, round_ids: Sequence[str]) -> list[str]:
    """Mark these rounds interrupted if they are still pending, each with an empty reply after
    what it holds; returns the ones this call settled (another process may have been first).
    The tasks' rows are locked first, as every other writer of rounds does."""
    if not round_ids:
        return []
    still = and_(Round.id.in_(list(round_ids)), Round.status == ROUND_PENDING)
    task_ids = list(conn.execute(select(Round.task_id).where(still).distinct()).scalars())
    if not task_ids:
        return []
    # A finished round changed: every process's copy of these histories is read again.
    conn.execute(
        update(Task).where(Task.id.in_(task_ids)).values(version=Task.version + 1, edits=Task.edits + 1)
    )
    settled = list(
        conn.execute(
            update(Round)
            .where(still)
            .values(status=ROUND_INTERRUPTED, interrupted=True, owner=None, finished_at=datetime.now(timezone.utc))
            .returning(Round.id)
        ).scalars()
    )
    for round_id in settled:
        last = conn.execute(
            select(Message.position, Message.role)
            .where(Message.round_id == round_id)
            .order_by(Message.position.desc())
            .limit(1)
        ).first()
        if last is None or last.role != "assistant":
            conn.execute(
                insert(Message).values(
                    round_id=round_id,
                    position=0 if last is None else last.position + 1,
                    role="assistant",
                    content="",
                    tokens=4,
                )
            )
    return settled


def forget_instances(conn: Connection, older_than_s: float) -> None:
    """Rows of processes whose lease ran out long ago (their rounds are settled by now)."""
    conn.execute(delete(Instance).where(Instance.lease_expires < _db_now(conn.dialect.name) - literal(older_than_s)))


# -- the lease ---------------------------------------------------------------------------------


class Lease:
    """This process's instance row, renewed in the background for as long as it serves."""

    def __init__(self, db: Database, lease_s: float, chores: str | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.chores = chores
        self.process = process_identity()
        self._db = db
        self._lease_s = lease_s
        self._task: asyncio.Task[None] | None = None
        # Writes of this process's rounds that failed (the database was unreachable), by round:
        # retried with every renewal, in order, until they go through. While they wait, the
        # rounds stay pending under this live lease, and later rounds of their tasks go on
        # without them.
        self._unfinished: dict[str, Callable[[], Awaitable[object]]] = {}
        # Whether this process still works on one of its own pending rounds (set by the chat
        # service); one it does not work on is an orphan: its claim committed, but the answer
        # never came back (the connection died), so nobody will finish it.
        self.works_on: Callable[[PendingRound], bool] = lambda _pending: True

    def is_dead(self, pending: PendingRound) -> bool:
        """Nobody will finish this round: its owner's lease ran out, or its process no longer
        runs on this machine, or it is this process's orphan. A round without owner (claimed by
        a version before leases) is never judged dead; it is only waited for up to
        `ROUND_WAIT_TIMEOUT_S`."""
        if pending.owner is None:
            return False
        if pending.owner == self.id:
            return pending.id not in self._unfinished and not self.works_on(pending)
        return bool(pending.expired) or local_process_gone(pending.process, self.process)

    async def start(self) -> None:
        """Take the lease before serving (a round claimed without it would look dead to others)
        and settle what dead processes left. A database that is down or not migrated yet does
        not stop the start: `/readyz` says so, and the renewals keep trying."""
        try:
            await self._db.run(renew_lease, self.id, self.process, self._lease_s, self.chores)
            await self.sweep()
        except Exception as exc:
            log.error("could not take this process's lease: %s", exc)
        self._task = asyncio.create_task(self._renew_forever(), name="lease")

    def retry_later(self, round_id: str, write: Callable[[], Awaitable[object]]) -> None:
        self._unfinished[round_id] = write

    async def _retry_unfinished(self) -> None:
        while self._unfinished:
            round_id, write = next(iter(self._unfinished.items()))
            await write()
            del self._unfinished[round_id]
            log.info("a round's delayed write went through; %d left", len(self._unfinished))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self._retry_unfinished()
            await self._db.run(drop_lease, self.id)
        except Exception as exc:  # the database may be gone at shutdown; the lease then runs out
            log.warning("could not drop this process's lease (%d round writes lost): %s", len(self._unfinished), exc)

    async def settle_dead(self, round_ids: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """Settle the given pending rounds (or all) whose owner is dead; returns the ones still
        pending with a live owner, and the ones settled here."""
        pending = await self._db.run(pending_rounds, round_ids)
        dead = [p.id for p in pending if self.is_dead(p)]
        settled = await self._db.run(settle, dead) if dead else []
        if settled:
            log.warning("settled %d round(s) left pending by a process that is gone", len(settled),
                        extra={"rounds": settled})
        return [p.id for p in pending if p.id not in dead], settled

    async def sweep(self) -> None:
        await self.settle_dead()
        await self._db.run(forget_instances, _FORGET_AFTER_S)

    async def _renew_forever(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self._lease_s / 4)
            beats += 1
            try:
                await self._db.run(renew_lease, self.id, self.process, self._lease_s, self.chores)
                await self._retry_unfinished()
                if beats % _SWEEP_EVERY == 0:
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down: keep trying, the lease may run out
                log.warning("lease renewal failed: %s", exc)
