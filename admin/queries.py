"""What the admin API reads: plain functions over a connection, tested through the API.

Tasks are listed newest activity first and paged with an opaque keyset cursor (the last row's
activity time and id), so a page costs the same however deep it is and rows written meanwhile
never shift a page.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.engine import Connection

from llm_proxy.models import Message, Round, Task
from llm_proxy.store import message_from_row
from orchestrator.models import CallbackEvent


@dataclass(frozen=True)
class TaskFilter:
    user_id: str | None = None
    room_id: str | None = None
    sdk_app_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def encode_cursor(updated_at: datetime, task_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([_utc(updated_at).isoformat(), task_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The cursor's position; a ValueError if it is not one this API made."""
    try:
        stamp, task_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(stamp), str(task_id)
    except (ValueError, TypeError) as exc:
        raise ValueError("not a cursor from this API") from exc


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def list_tasks(conn: Connection, where: TaskFilter, limit: int, cursor: tuple[datetime, str] | None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of tasks, and the cursor of the next page (None: this is the last)."""
    query = select(Task.__table__)
    for column, value in ((Task.user_id, where.user_id), (Task.room_id, where.room_id), (Task.sdk_app_id, where.sdk_app_id)):
        if value is not None:
            query = query.where(column == value)
    if where.since is not None:
        query = query.where(Task.updated_at >= _utc(where.since))
    if where.until is not None:
        query = query.where(Task.updated_at < _utc(where.until))
    if cursor is not None:
        stamp, task_id = cursor
        query = query.where(or_(Task.updated_at < _utc(stamp), and_(Task.updated_at == _utc(stamp), Task.id < task_id)))
    rows = conn.execute(query.order_by(Task.updated_at.desc(), Task.id.desc()).limit(limit + 1)).mappings().all()
    page = rows[:limit]
    # Counted for this page's tasks only.
    counts = {
        task_id: (rounds, int(interrupted or 0))
        for task_id, rounds, interrupted in conn.execute(
            select(Round.task_id, func.count(), func.sum(case((Round.interrupted.is_(True), 1), else_=0)))
            .where(Round.task_id.in_([row["id"] for row in page]))
            .group_by(Round.task_id)
        )
    }
    data = [{**_task(row), "rounds": counts.get(row["id"], (0, 0))[0], "interrupted": counts.get(row["id"], (0, 0))[1]} for row in page]
    last = rows[limit - 1] if len(rows) > limit else None
    return data, encode_cursor(last["updated_at"], last["id"]) if last else None


def _task(row: Any) -> dict[str, Any]:
    return {
        "task_id": row["id"],
        "sdk_app_id": row["sdk_app_id"],
        "user_id": row["user_id"],
        "room_id": row["room_id"],
        "room_id_type": row["room_id_type"],
        "first_activity": _utc(row["created_at"]).isoformat(),
        "last_activity": _utc(row["updated_at"]).isoformat(),
    }


def task_detail(conn: Connection, task_id: str) -> dict[str, Any] | None:
    task = conn.execute(select(Task.__table__).where(Task.id == task_id)).mappings().first()
    if task is None:
        return None
    rounds = conn.execute(select(Round.__table__).where(Round.task_id == task_id).order_by(Round.seq)).mappings().all()
    messages: dict[str, list[dict[str, Any]]] = {r["id"]: [] for r in rounds}
    for round_id, role, content, name, tool_call_id, tool_calls in conn.execute(
        select(Message.round_id, Message.role, Message.content, Message.name, Message.tool_call_id, Message.tool_calls)
        .where(Message.round_id.in_(list(messages)))
        .order_by(Message.round_id, Message.position)
    ):
        messages[round_id].append(message_from_row(role, content, name, tool_call_id, tool_calls))
    events = conn.execute(
        select(CallbackEvent.__table__).where(CallbackEvent.task_id == task_id).order_by(CallbackEvent.id)
    ).mappings().all()
    return {
        **_task(task),
        "rounds": [
            {
                "seq": r["seq"],
                "round_id": r["id"],
                "request_id": r["request_id"],
                "trtc_round_id": r["trtc_round_id"],
                "status": r["status"],
                "interrupted": bool(r["interrupted"]),
                "model": r["model"],
                "profile": r["profile"],
                "upstream": r["upstream"],
                "finish_reason": r["finish_reason"],
                "usage": r["usage"],
                "started_at": _utc(r["created_at"]).isoformat(),
                "finished_at": _utc(r["finished_at"]).isoformat() if r["finished_at"] else None,
                "messages": messages[r["id"]],
                # What the user did not hear (event 905 cut it from the stored reply).
                "unheard": r["unheard"],
                "events": [_event(e) for e in events if e["round_id"] == r["id"]],
            }
            for r in rounds
        ],
        "events": [_event(e) for e in events if e["round_id"] is None],
    }


def _event(event: Any) -> dict[str, Any]:
    return {
        "event_type": event["event_type"],
        "trtc_round_id": event["trtc_round_id"],
        "event_ms_ts": event["event_ms_ts"],
        "payload": (event["body"].get("EventInfo") or {}).get("Payload"),
        "received_at": _utc(event["received_at"]).isoformat(),
    }
