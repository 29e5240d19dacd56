"""Claiming a round, called directly on both backends: PostgreSQL claims a new round in one
autocommitted statement (`claim_new_round`) and leaves retries to `claim_round`'s transaction."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Connection

from core.db import Database
from llm_proxy import store
from llm_proxy.models import ROUND_PENDING, Round, Task
from tests.support import on_db



def _add_task_then_fail(conn: Connection, task_id: str) -> None:
    now = datetime.now(timezone.utc)
    conn.execute(Task.__table__.insert().values(id=task_id, last_seq=0, created_at=now, updated_at=now))
    raise RuntimeError("after the first statement")


def _task_ids(conn: Connection, task_id: str) -> list[str]:
    return list(conn.execute(select(Task.id).where(Task.id == task_id)).scalars())


def test_autocommit_keeps_each_statement_on_postgres_and_is_one_transaction_on_sqlite(migrated_url: str) -> None:
    task_id = f"autocommit-{uuid.uuid4().hex[:8]}"

    async def work(db: Database) -> list[str]:
        with pytest.raises(RuntimeError):
            await db.run_autocommit(_add_task_then_fail, task_id)
        return await db.run(_task_ids, task_id)

    kept = on_db(migrated_url, work)
    assert kept == ([task_id] if migrated_url.startswith("postgresql") else [])


def _rounds(conn: Connection, task_id: str) -> list[tuple[int, str | None, str]]:
    rows = conn.execute(select(Round.seq, Round.request_id, Round.status).where(Round.task_id == task_id).order_by(Round.seq))
    return [tuple(row) for row in rows]


# SQLite claims in one local transaction, which costs nothing there.
only_postgres = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


@only_postgres
def test_one_statement_claims_a_new_round_and_leaves_a_retry_to_the_transaction(migrated_url: str) -> None:
    task = store.TaskInfo(f"claim-{uuid.uuid4().hex[:8]}", request_id="r1", user_id="u1")

    async def work(db: Database) -> tuple[Any, ...]:
        first = await db.run_autocommit(store.claim_new_round, task, max_rounds=50)
        second = await db.run_autocommit(
            store.claim_new_round, store.TaskInfo(task.task_id, request_id="r2"), max_rounds=50
        )
        retried = await db.run_autocommit(store.claim_new_round, task, max_rounds=50)
        retry = await db.run(store.claim_round, task, max_rounds=50)
        rows = await db.run(_rounds, task.task_id)
        user = await db.run(lambda conn: conn.execute(select(Task.user_id).where(Task.id == task.task_id)).scalar())
        return first, second, retried, retry, rows, user

    first, second, retried, retry, rows, user = on_db(migrated_url, work)
    assert (first.seq, first.history, first.pending_before) == (1, [], [])
    # The second round finds the first still pending: it waits for it before reading history.
    assert second.seq == 2 and second.pending_before == [first.round_id] and second.history is None
    # The same request id again claims nothing; the transaction finds the round it retries.
    assert retried is None
    assert retry.round_id == first.round_id and retry.in_flight
    assert rows == [(1, "r1", ROUND_PENDING), (2, "r2", ROUND_PENDING)]
    assert user == "u1"


@only_postgres
def test_the_one_statement_claim_leaves_the_connection_flushing_commits(migrated_url: str) -> None:
    """Its commit skips the WAL flush for that statement only (`SET LOCAL`), not for whatever
    runs on the pooled connection next."""
    task = store.TaskInfo(f"flush-{uuid.uuid4().hex[:8]}", request_id="r1")

    def claim_then_show(conn: Connection) -> str:
        assert store.claim_new_round(conn, task, max_rounds=50) is not None
        return conn.exec_driver_sql("SHOW synchronous_commit").scalar()

    assert on_db(migrated_url, lambda db: db.run_autocommit(claim_then_show)) == "on"


@only_postgres
def test_a_new_round_is_finished_in_one_statement_with_every_message_field(migrated_url: str) -> None:
    task = store.TaskInfo(f"finish-{uuid.uuid4().hex[:8]}", request_id="r1")
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Zürich"}'}}
    said = [
        {"role": "user", "content": "天气怎么样? \"quoted\" \\ and a newline\n"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "weather"},
        {"role": "assistant", "content": "It is sunny."},
    ]

    async def work(db: Database) -> tuple[Any, ...]:
        claim = await db.run_autocommit(store.claim_new_round, task, max_rounds=50)
        version, stored, _held = await db.run_autocommit(
            store.finish_round, claim, said, interrupted=False, model="m", finish_reason="stop", usage={"prompt_tokens": 3}
        )
        history = await db.run(store.load_history, task.task_id, claim.seq + 1, max_rounds=50)
        row = await db.run(lambda conn: conn.execute(
            select(Round.status, Round.tokens, Round.usage, Task.version).join(Task).where(Round.id == claim.round_id)
        ).one())
        return version, stored, history, tuple(row)

    version, stored, history, (status, tokens, usage, task_version) = on_db(migrated_url, work)
    assert [h.messages for h in history] == [said] == [stored.messages]
    assert (status, usage, task_version) == ("completed", {"prompt_tokens": 3}, version)
    assert tokens == stored.tokens > 0
