"""A crashed round never stalls its task (`llm_proxy/recovery.py`): `kill -9` mid-stream, then the
next round of the task, on a restarted server or on another replica, starts at once, with the
crashed round's user words in its context; leases settle rounds of processes on other machines."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from core.db import Database
from llm_proxy import recovery, store
from llm_proxy.models import ROUND_PENDING, Instance, Round
from tests.support import Proxy, Upstream, first_text, headers, marker, on_db, wait_until

SYSTEM = {"role": "system", "content": "Be brief."}


def _user(text: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": text}]


def _crash_mid_stream(server: Proxy, task_id: str, text: str) -> None:
    """Stream a long reply in the task and `kill -9` the server while it streams."""
    stream = server.client().chat.completions.create(
        model="m", stream=True, extra_headers=headers(task_id), messages=_user(text)
    )
    first_text(stream)
    server.kill()
    stream.close()


def _time_to_first_token(server: Proxy, task_id: str, text: str) -> float:
    started = time.perf_counter()
    stream = server.client().chat.completions.create(
        model="m", stream=True, extra_headers=headers(task_id), messages=_user(text)
    )
    first_text(stream)
    elapsed = time.perf_counter() - started
    for _rest in stream:
        pass
    return elapsed


def _assert_crashed_round_kept(server: Proxy, upstream: Upstream, task_id: str, crashed: str, after: str) -> None:
    first, second = server.rounds(task_id)
    assert first["status"] == "interrupted" and first["interrupted"]
    assert first["messages"] == [{"role": "user", "content": crashed}, {"role": "assistant", "content": ""}]
    assert second["status"] == "completed"
    # The user's crashed words are in the next round's context (the empty reply is not).
    assert upstream.requests(after)[0]["messages"][1:] == [
        {"role": "user", "content": crashed},
        {"role": "user", "content": after},
    ]


def test_kill_9_mid_stream_then_restart_answers_the_next_round_at_once(
    start_proxy, upstream: Upstream, migrated_url: str, tmp_path
) -> None:
    # A long lease: only the restarted process's own check (the dead pid) may settle the round.
    server = start_proxy({"DATABASE_URL": migrated_url, "INSTANCE_LEASE_S": "60"}, workdir=tmp_path / "crash")
    tag = marker()
    task_id = f"task-{tag}"
    crashed = f"{tag} long [[words:2000]] [[delay:0.01]]"
    _crash_mid_stream(server, task_id, crashed)
    server.start()
    after = f"{tag} after the crash"
    assert _time_to_first_token(server, task_id, after) < 0.5
    # Settled by the restarted process, or by any other on the database (they all sweep).
    _assert_crashed_round_kept(server, upstream, task_id, crashed, after)


def test_a_replica_settles_the_round_of_a_replica_that_is_down(
    start_proxy, upstream: Upstream, migrated_url: str
) -> None:
    one = start_proxy({"DATABASE_URL": migrated_url, "INSTANCE_LEASE_S": "60"})
    two = start_proxy({"DATABASE_URL": migrated_url, "INSTANCE_LEASE_S": "60"})
    tag = marker()
    task_id = f"task-{tag}"
    crashed = f"{tag} long [[words:2000]] [[delay:0.01]]"
    _crash_mid_stream(one, task_id, crashed)
    after = f"{tag} on the other replica"
    assert _time_to_first_token(two, task_id, after) < 0.5
    _assert_crashed_round_kept(two, upstream, task_id, crashed, after)


def test_a_started_process_settles_dead_rounds_without_being_asked(
    start_proxy, migrated_url: str
) -> None:
    one = start_proxy({"DATABASE_URL": migrated_url})
    tag = marker()
    task_id = f"task-{tag}"
    _crash_mid_stream(one, task_id, f"{tag} long [[words:2000]] [[delay:0.01]]")
    start_proxy({"DATABASE_URL": migrated_url})
    [settled] = wait_until(lambda: one.rounds(task_id), timeout=5, what="the dead round settled at start-up")
    assert settled["status"] == "interrupted"


# -- leases, called directly on both databases ---------------------------------------------------


def _claim(db: Database, owner: str, task_id: str, text: str) -> Any:
    task = store.TaskInfo(task_id, request_id=uuid.uuid4().hex)
    return db.run(store.claim_round, task, max_rounds=50, owner=owner, head=[{"role": "user", "content": text}])


def _status(conn: Connection, round_id: str) -> str:
    return conn.execute(select(Round.status).where(Round.id == round_id)).scalar_one()


def test_a_lease_run_out_on_another_machine_settles_its_rounds_and_a_live_one_does_not(migrated_url: str) -> None:
    task_id = f"lease-{uuid.uuid4().hex[:8]}"

    async def work(db: Database) -> tuple[Any, ...]:
        me, live, gone = (recovery.Lease(db, 60) for _ in range(3))
        await db.run(recovery.renew_lease, live.id, "other-boot:1:1:1", 60)
        # A process on another machine (nothing local to check) whose lease ran out.
        await db.run(recovery.renew_lease, gone.id, "other-boot:1:1:1", -1)
        alive = await _claim(db, live.id, task_id, "live")
        dead = await _claim(db, gone.id, task_id, "dead")
        still, settled = await me.settle_dead([alive.round_id, dead.round_id])
        again = await me.settle_dead([dead.round_id])
        return alive, dead, still, settled, again, await db.run(_status, alive.round_id)

    alive, dead, still, settled, again, alive_status = on_db(migrated_url, work)
    assert (still, settled, again) == ([alive.round_id], [dead.round_id], ([], []))
    assert alive_status == ROUND_PENDING


def test_a_round_settled_while_its_owner_stalled_keeps_its_settled_form(migrated_url: str) -> None:
    task_id = f"stall-{uuid.uuid4().hex[:8]}"

    async def work(db: Database) -> tuple[Any, ...]:
        owner = recovery.Lease(db, 60)
        claim = await _claim(db, owner.id, task_id, "hello")
        assert await db.run(recovery.settle, [claim.round_id]) == [claim.round_id]
        said = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "late reply"}]
        finished = await db.run(
            store.finish_round, claim, said, interrupted=False, model="m", finish_reason="stop", usage=None
        )
        return finished, await db.run(store.round_messages, task_id)

    finished, rounds = on_db(migrated_url, work)
    assert finished is None
    assert [r["messages"] for r in rounds] == [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]]


def test_instance_rows_are_renewed_and_dropped(migrated_url: str) -> None:
    async def work(db: Database) -> tuple[Any, ...]:
        lease = recovery.Lease(db, 0.2)
        await lease.start()
        first = await db.run(_expiry, lease.id)
        deadline = time.monotonic() + 5
        second = first
        while second == first and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            second = await db.run(_expiry, lease.id)
        await lease.stop()
        return first, second, await db.run(_expiry, lease.id)

    first, second, after_stop = on_db(migrated_url, work)
    assert second > first and after_stop is None


def _expiry(conn: Connection, instance_id: str) -> float | None:
    return conn.execute(select(Instance.lease_expires).where(Instance.id == instance_id)).scalar()


def test_a_process_that_is_gone_is_told_apart_from_one_that_runs() -> None:
    mine = recovery.process_identity()
    assert mine is not None  # Linux, as everywhere this project is tested
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        theirs = recovery._identity_of(child.pid)
        assert not recovery.local_process_gone(theirs, mine)
    finally:
        child.kill()
        child.wait()
    assert recovery.local_process_gone(theirs, mine)
    assert not recovery.local_process_gone(mine, mine)
    # Another machine (or pid namespace) cannot be checked from here: only its lease tells.
    boot, namespace, pid, started = theirs.split(":")
    assert not recovery.local_process_gone(f"another-boot:{namespace}:{pid}:{started}", mine)
    assert not recovery.local_process_gone(None, mine)


def test_an_orphan_of_this_process_is_settled_and_a_round_it_works_on_is_not(migrated_url: str) -> None:
    # An orphan: its claim committed but the answer was lost with the connection, so nobody
    # in this (live) process will finish it.
    task_id = f"orphan-{uuid.uuid4().hex[:8]}"

    async def work(db: Database) -> tuple[Any, ...]:
        me = recovery.Lease(db, 60)
        orphan = await _claim(db, me.id, task_id, "lost")
        working = await _claim(db, me.id, task_id, "streaming")
        delayed = await _claim(db, me.id, task_id, "its finish waits for the database")
        me.works_on = lambda pending: pending.id == working.round_id
        me.retry_later(delayed.round_id, lambda: db.run(store.release_round, delayed))
        still, settled = await me.settle_dead([orphan.round_id, working.round_id, delayed.round_id])
        return orphan, working, delayed, still, settled

    orphan, working, delayed, still, settled = on_db(migrated_url, work)
    assert (sorted(still), settled) == (sorted([working.round_id, delayed.round_id]), [orphan.round_id])
