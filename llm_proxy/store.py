"""Round storage in SQL: claiming a round in order, the history window, finishing a round.

Ordering across processes comes from the database: a round takes its sequence number with an
upsert on the task row, which holds that row's lock (PostgreSQL) or the write lock (SQLite,
`BEGIN IMMEDIATE`) until the claim commits. A round then waits for every earlier round of its task
that is still pending before it reads the history, so its context includes them.

Every function runs one short transaction; no connection is held while the upstream streams.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from functools import cache
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db import transaction
from llm_proxy.context import Msg, StoredRound, message_tokens, window
from llm_proxy.models import (
    FINISHED_STATUSES,
    ROUND_COMPLETED,
    ROUND_INTERRUPTED,
    ROUND_PENDING,
    Message,
    Round,
    Task,
)


@dataclass(frozen=True)
class TaskInfo:
    """The orchestrator's identification of one request (its `X-*` headers)."""

    task_id: str
    request_id: str | None = None
    sdk_app_id: str | None = None
    user_id: str | None = None
    room_id: str | None = None
    room_id_type: str | None = None


@dataclass
class Claim:
    round_id: str
    seq: int
    # A retry of an interrupted round: answered again in place, replacing its messages.
    regenerate: bool = False
    # A retry of a completed round: its stored reply, sent again without the upstream.
    replay_text: str | None = None
    replay_usage: dict[str, int] | None = None
    # A retry whose first attempt is still pending: wait for it, then claim again.
    in_flight: bool = False
    # Earlier rounds of the task still pending when this one was claimed.
    pending_before: list[str] = field(default_factory=list)
    # Loaded in the claim's own transaction when nothing earlier was pending.
    history: list[StoredRound] | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def claim_round(
    engine: AsyncEngine,
    task: TaskInfo,
    *,
    max_rounds: int,
    max_tokens: int,
    take_over_pending: bool = False,
) -> Claim:
    """Take the task's next sequence number for a new round, or find the round this request
    retries; and, unless an earlier round is still pending, read the history window. Three
    statements on the usual path: each costs a thread hop on SQLite, so they are kept few."""
    async with transaction(engine) as conn:
        statements = _statements(conn.dialect.name)
        now = _now()
        seq = (
            await conn.execute(
                statements.next_seq,
                {
                    "id": task.task_id,
                    "sdk_app_id": task.sdk_app_id,
                    "user_id": task.user_id,
                    "room_id": task.room_id,
                    "room_id_type": task.room_id_type,
                    "last_seq": 1,
                    "created_at": now,
                    "updated_at": now,
                },
            )
        ).scalar_one()
        round_id = uuid.uuid4().hex
        inserted = await conn.execute(
            statements.insert_round,
            {
                "id": round_id,
                "task_id": task.task_id,
                "seq": seq,
                "request_id": task.request_id,
                "status": ROUND_PENDING,
                "interrupted": False,
                "tokens": 0,
                "created_at": now,
            },
        )
        if inserted.first() is not None:
            claim = Claim(round_id, seq)
        else:
            # The same request id was seen before: this is the orchestrator retrying.
            claim = await _claim_retry(conn, task, take_over_pending)
            if claim.replay_text is not None or claim.in_flight:
                return claim
        claim.pending_before, history = await _window(conn, task.task_id, claim.seq, max_rounds, max_tokens)
        if not claim.pending_before:
            claim.history = history
        return claim


@dataclass(frozen=True)
class _Statements:
    next_seq: Any
    insert_round: Any


@cache
def _statements(dialect_name: str) -> _Statements:
    """The claim's statements, built once per dialect: building and cache-keying them on every
    request cost about as much as running them."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    upsert = dialect.insert(Task)
    excluded = upsert.excluded
    next_seq = upsert.on_conflict_do_update(
        index_elements=[Task.id],
        set_={
            "last_seq": Task.last_seq + 1,
            "updated_at": excluded.updated_at,
            "sdk_app_id": func.coalesce(excluded.sdk_app_id, Task.sdk_app_id),
            "user_id": func.coalesce(excluded.user_id, Task.user_id),
            "room_id": func.coalesce(excluded.room_id, Task.room_id),
            "room_id_type": func.coalesce(excluded.room_id_type, Task.room_id_type),
        },
    ).returning(Task.last_seq)
    insert_round = (
        dialect.insert(Round)
        .on_conflict_do_nothing(index_elements=[Round.task_id, Round.request_id])
        .returning(Round.id)
    )
    return _Statements(next_seq, insert_round)


async def _claim_retry(conn: AsyncConnection, task: TaskInfo, take_over_pending: bool) -> Claim:
    row = (
        await conn.execute(
            select(Round.id, Round.seq, Round.status, Round.usage).where(
                Round.task_id == task.task_id, Round.request_id == task.request_id
            )
        )
    ).one()
    if row.status == ROUND_COMPLETED:
        return Claim(row.id, row.seq, replay_text=await _reply_text(conn, row.id), replay_usage=row.usage)
    if row.status == ROUND_PENDING and not take_over_pending:
        return Claim(row.id, row.seq, in_flight=True)
    await conn.execute(update(Round).where(Round.id == row.id).values(status=ROUND_PENDING))
    return Claim(row.id, row.seq, regenerate=True)


async def _reply_text(conn: AsyncConnection, round_id: str) -> str:
    result = await conn.execute(
        select(Message.content)
        .where(Message.round_id == round_id, Message.role == "assistant")
        .order_by(Message.position.desc())
        .limit(1)
    )
    return result.scalar() or ""


async def load_history(
    engine: AsyncEngine, task_id: str, before_seq: int, *, max_rounds: int, max_tokens: int
) -> list[StoredRound]:
    async with transaction(engine) as conn:
        _pending, history = await _window(conn, task_id, before_seq, max_rounds, max_tokens)
        return history


_recent = (
    select(Round.id, Round.seq, Round.tokens, Round.status)
    .where(Round.task_id == bindparam("task_id"), Round.seq < bindparam("before_seq"))
    .order_by(Round.seq.desc())
    .limit(bindparam("limit"))
    .subquery()
)
_WINDOW = (
    select(
        _recent.c.id,
        _recent.c.seq,
        _recent.c.tokens,
        _recent.c.status,
        Message.role,
        Message.content,
        Message.name,
        Message.tool_call_id,
        Message.tool_calls,
    )
    .select_from(_recent.outerjoin(Message, Message.round_id == _recent.c.id))
    .order_by(_recent.c.seq.desc(), Message.position)
)


async def _window(
    conn: AsyncConnection, task_id: str, before_seq: int, max_rounds: int, max_tokens: int
) -> tuple[list[str], list[StoredRound]]:
    """The still-pending rounds among the last `max_rounds` before `before_seq`, and the history
    window of finished ones, in one query (rounds joined with their messages). A pending round
    further back than the window is a dead one (its process crashed) and is not waited for."""
    rows = await conn.execute(_WINDOW, {"task_id": task_id, "before_seq": before_seq, "limit": max(max_rounds, 1)})
    pending: list[str] = []
    finished: list[StoredRound] = []
    for round_id, seq, tokens, status, role, content, name, tool_call_id, tool_calls in rows:
        if status == ROUND_PENDING:
            if round_id not in pending:
                pending.append(round_id)
            continue
        if not finished or finished[-1].seq != seq:
            finished.append(StoredRound(seq, tokens, []))
        if role is not None:
            finished[-1].messages.append(_message(role, content, name, tool_call_id, tool_calls))
    return pending, window(finished, max_rounds, max_tokens)


def _message(
    role: str, content: str | None, name: str | None, tool_call_id: str | None, tool_calls: Any
) -> Msg:
    message: Msg = {"role": role, "content": content}
    if name is not None:
        message["name"] = name
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return message


async def _messages_by_round(conn: AsyncConnection, round_ids: list[str]) -> dict[str, list[Msg]]:
    by_id: dict[str, list[Msg]] = {round_id: [] for round_id in round_ids}
    rows = await conn.execute(
        select(
            Message.round_id,
            Message.role,
            Message.content,
            Message.name,
            Message.tool_call_id,
            Message.tool_calls,
        )
        .where(Message.round_id.in_(round_ids))
        .order_by(Message.round_id, Message.position)
    )
    for round_id, role, content, name, tool_call_id, tool_calls in rows:
        by_id[round_id].append(_message(role, content, name, tool_call_id, tool_calls))
    return by_id


async def still_pending(engine: AsyncEngine, round_ids: Sequence[str]) -> list[str]:
    async with transaction(engine) as conn:
        result = await conn.execute(
            select(Round.id).where(Round.id.in_(list(round_ids)), Round.status == ROUND_PENDING)
        )
        return list(result.scalars())


async def finish_round(
    engine: AsyncEngine,
    claim: Claim,
    messages: Sequence[Msg],
    *,
    interrupted: bool,
    model: str,
    finish_reason: str | None,
    usage: dict[str, int] | None,
) -> None:
    """Store the round's messages and mark it finished, in one transaction."""
    rows = [
        {
            "round_id": claim.round_id,
            "position": position,
            "role": message["role"],
            "content": message.get("content"),
            "name": message.get("name"),
            "tool_call_id": message.get("tool_call_id"),
            "tool_calls": message.get("tool_calls"),
            "tokens": message_tokens(message),
        }
        for position, message in enumerate(messages)
    ]
    async with transaction(engine) as conn:
        if claim.regenerate:
            await conn.execute(delete(Message).where(Message.round_id == claim.round_id))
        await conn.execute(insert(Message), rows)
        await conn.execute(
            update(Round)
            .where(Round.id == claim.round_id)
            .values(
                status=ROUND_INTERRUPTED if interrupted else ROUND_COMPLETED,
                interrupted=interrupted,
                tokens=sum(row["tokens"] for row in rows),
                model=model,
                finish_reason=finish_reason,
                usage=usage,
                finished_at=_now(),
            )
        )


async def release_round(engine: AsyncEngine, claim: Claim) -> None:
    """Undo a claim whose upstream failed before answering: nothing of the round stays
    (a regenerated round goes back to its earlier, interrupted state)."""
    async with transaction(engine) as conn:
        if claim.regenerate:
            await conn.execute(
                update(Round).where(Round.id == claim.round_id).values(status=ROUND_INTERRUPTED)
            )
        else:
            await conn.execute(delete(Round).where(Round.id == claim.round_id))


async def round_messages(engine: AsyncEngine, task_id: str) -> list[dict[str, Any]]:
    """Every finished round of a task, oldest first, with its messages (for tests and tools)."""
    async with transaction(engine) as conn:
        rounds = (
            await conn.execute(
                select(Round.id, Round.seq, Round.status, Round.interrupted, Round.request_id)
                .where(Round.task_id == task_id, Round.status.in_(FINISHED_STATUSES))
                .order_by(Round.seq)
            )
        ).all()
        by_id = await _messages_by_round(conn, [row.id for row in rounds])
    return [
        {
            "id": row.id,
            "seq": row.seq,
            "status": row.status,
            "interrupted": row.interrupted,
            "request_id": row.request_id,
            "messages": by_id[row.id],
        }
        for row in rounds
    ]
