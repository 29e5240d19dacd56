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
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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
    async with engine.begin() as conn:
        claim = None
        if task.request_id is not None:
            claim = await _claim_retry(conn, task, take_over_pending)
            if claim is not None and (claim.replay_text is not None or claim.in_flight):
                return claim
        if claim is None:
            seq = await _next_seq(conn, task)
            claim = Claim(round_id=uuid.uuid4().hex, seq=seq)
            await conn.execute(
                insert(Round).values(
                    id=claim.round_id,
                    task_id=task.task_id,
                    seq=seq,
                    request_id=task.request_id,
                    status=ROUND_PENDING,
                    interrupted=False,
                    tokens=0,
                    created_at=_now(),
                )
            )
        pending = await conn.execute(
            select(Round.id).where(
                Round.task_id == task.task_id, Round.seq < claim.seq, Round.status == ROUND_PENDING
            )
        )
        claim.pending_before = list(pending.scalars())
        if not claim.pending_before:
            claim.history = await _history(conn, task.task_id, claim.seq, max_rounds, max_tokens)
        return claim


async def _claim_retry(conn: AsyncConnection, task: TaskInfo, take_over_pending: bool) -> Claim | None:
    row = (
        await conn.execute(
            select(Round.id, Round.seq, Round.status, Round.usage).where(
                Round.task_id == task.task_id, Round.request_id == task.request_id
            )
        )
    ).first()
    if row is None:
        return None
    if row.status == ROUND_COMPLETED:
        return Claim(row.id, row.seq, replay_text=await _reply_text(conn, row.id), replay_usage=row.usage)
    if row.status == ROUND_PENDING and not take_over_pending:
        return Claim(row.id, row.seq, in_flight=True)
    await conn.execute(update(Round).where(Round.id == row.id).values(status=ROUND_PENDING))
    return Claim(row.id, row.seq, regenerate=True)


async def _next_seq(conn: AsyncConnection, task: TaskInfo) -> int:
    now = _now()
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(Task).values(
        id=task.task_id,
        sdk_app_id=task.sdk_app_id,
        user_id=task.user_id,
        room_id=task.room_id,
        room_id_type=task.room_id_type,
        last_seq=1,
        created_at=now,
        updated_at=now,
    )
    excluded = stmt.excluded
    stmt = stmt.on_conflict_do_update(
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
    return (await conn.execute(stmt)).scalar_one()


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
    async with engine.connect() as conn:
        return await _history(conn, task_id, before_seq, max_rounds, max_tokens)


@dataclass(frozen=True)
class _RoundRef:
    id: str
    seq: int
    tokens: int


async def _history(
    conn: AsyncConnection, task_id: str, before_seq: int, max_rounds: int, max_tokens: int
) -> list[StoredRound]:
    if max_rounds <= 0:
        return []
    result = await conn.execute(
        select(Round.id, Round.seq, Round.tokens)
        .where(Round.task_id == task_id, Round.seq < before_seq, Round.status.in_(FINISHED_STATUSES))
        .order_by(Round.seq.desc())
        .limit(max_rounds)
    )
    chosen = window([_RoundRef(*row) for row in result], max_rounds, max_tokens)
    if not chosen:
        return []
    by_id = await _messages_by_round(conn, [ref.id for ref in chosen])
    return [StoredRound(ref.seq, ref.tokens, by_id[ref.id]) for ref in chosen]


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
        message: Msg = {"role": role, "content": content}
        if name is not None:
            message["name"] = name
        if tool_call_id is not None:
            message["tool_call_id"] = tool_call_id
        if tool_calls is not None:
            message["tool_calls"] = tool_calls
        by_id[round_id].append(message)
    return by_id


async def still_pending(engine: AsyncEngine, round_ids: Sequence[str]) -> list[str]:
    async with engine.connect() as conn:
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
    async with engine.begin() as conn:
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
    async with engine.begin() as conn:
        if claim.regenerate:
            await conn.execute(
                update(Round).where(Round.id == claim.round_id).values(status=ROUND_INTERRUPTED)
            )
        else:
            await conn.execute(delete(Round).where(Round.id == claim.round_id))


async def round_messages(engine: AsyncEngine, task_id: str) -> list[dict[str, Any]]:
    """Every finished round of a task, oldest first, with its messages (for tests and tools)."""
    async with engine.connect() as conn:
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
