"""What the admin API reads: plain functions over a connection, tested through the API.

Tasks are listed newest activity first and paged with an opaque keyset cursor (the last row's
activity time and id), so a page costs the same however deep it is and rows written meanwhile
never shift a page.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, case, func, literal, or_, select
from sqlalchemy.engine import Connection

from core.limits import parse_json
from llm_proxy.models import ROUND_COMPLETED, ROUND_INTERRUPTED, ROUND_PENDING, FailedRequest, Round, Task, storable_id
from llm_proxy.store import messages_of_rounds
from memory.models import Summary, UserMemory
from orchestrator.models import CallbackEvent
from orchestrator.protocol import METRIC


@dataclass(frozen=True)
class TaskFilter:
    user_id: str | None = None
    room_id: str | None = None
    sdk_app_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def encode_cursor(updated_at: datetime, task_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([as_utc(updated_at).isoformat(), task_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The cursor's position; a ValueError if it is not one this API made."""
    try:
        stamp, task_id = parse_json(base64.urlsafe_b64decode(cursor.encode()))
        moment = as_utc(datetime.fromisoformat(stamp))
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError("not a cursor from this API") from exc
    if not isinstance(task_id, str) or not storable_id(task_id):
        raise ValueError("not a cursor from this API")
    return moment, task_id


def _task_user_memory(conn: Connection, summary: Any) -> dict[str, Any]:
    now = conn.execute(select(UserMemory.text).where(
        UserMemory.sdk_app_id == summary["user_app"], UserMemory.profile == summary["user_profile"],
        UserMemory.user_id == summary["user_id"])).scalar()
    return {
        "sdk_app_id": summary["user_app"],
        "profile": summary["user_profile"],
        "user_id": summary["user_id"],
        # What the task's rounds carry: the memory as the task began.
        "at_start": summary["user_memory"],
        # The task's rounds up to this one are in the user's memory.
        "folded_through_seq": summary["user_folded_seq"],
        "now": now,
    }


def user_memories(conn: Connection, sdk_app_id: str, user_id: str) -> list[dict[str, Any]]:
    """The user's memory in each profile."""
    rows = conn.execute(
        select(UserMemory.profile, UserMemory.text, UserMemory.version, UserMemory.created_at, UserMemory.updated_at)
        .where(UserMemory.sdk_app_id == sdk_app_id, UserMemory.user_id == user_id).order_by(UserMemory.profile)
    )
    return [
        {"profile": row.profile, "text": row.text, "version": row.version,
         "created_at": as_utc(row.created_at).isoformat(), "updated_at": as_utc(row.updated_at).isoformat()}
        for row in rows
    ]


def as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def list_tasks(conn: Connection, where: TaskFilter, limit: int, cursor: tuple[datetime, str] | None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of tasks, and the cursor of the next page (None: this is the last)."""
    query = select(Task.__table__)
    for column, value in ((Task.user_id, where.user_id), (Task.room_id, where.room_id), (Task.sdk_app_id, where.sdk_app_id)):
        if value is not None:
            query = query.where(column == value)
    if where.since is not None:
        query = query.where(Task.updated_at >= as_utc(where.since))
    if where.until is not None:
        query = query.where(Task.updated_at < as_utc(where.until))
    if cursor is not None:
        stamp, task_id = cursor
        query = query.where(or_(Task.updated_at < as_utc(stamp), and_(Task.updated_at == as_utc(stamp), Task.id < task_id)))
    rows = conn.execute(query.order_by(Task.updated_at.desc(), Task.id.desc()).limit(limit + 1)).mappings().all()
    page = rows[:limit]
    # Counted for this page's tasks only.
    ids = [row["id"] for row in page]
    counts = {
        task_id: (rounds, int(interrupted or 0), int(errors or 0))
        for task_id, rounds, interrupted, errors in conn.execute(
            select(
                Round.task_id,
                func.count(),
                func.sum(case((Round.interrupted.is_(True), 1), else_=0)),
                func.sum(case((Round.error.is_not(None), 1), else_=0)),
            )
            # Round 0 is the welcome line (`store.WELCOME`), not an exchange.
            .where(Round.task_id.in_(ids), Round.seq > 0)
            .group_by(Round.task_id)
        )
    }
    failed: dict[str, int] = {
        task_id: count
        for task_id, count in conn.execute(
            select(FailedRequest.task_id, func.count()).where(FailedRequest.task_id.in_(ids)).group_by(FailedRequest.task_id)
        )
    }
    data = []
    for row in page:
        rounds, interrupted, errors = counts.get(row["id"], (0, 0, 0))
        data.append({**_task(row), "rounds": rounds, "interrupted": interrupted, "errors": errors + failed.get(row["id"], 0)})
    last = rows[limit - 1] if len(rows) > limit else None
    return data, encode_cursor(last["updated_at"], last["id"]) if last else None


def _task(row: Any) -> dict[str, Any]:
    return {
        "task_id": row["id"],
        "sdk_app_id": row["sdk_app_id"],
        "user_id": row["user_id"],
        "room_id": row["room_id"],
        "room_id_type": row["room_id_type"],
        "first_activity": as_utc(row["created_at"]).isoformat(),
        "last_activity": as_utc(row["updated_at"]).isoformat(),
        # The orchestrator stopped the task (event 902): when, and its LeaveCode.
        "ended_at": as_utc(row["ended_at"]).isoformat() if row["ended_at"] else None,
        "leave_code": row["leave_code"],
    }


def task_detail(conn: Connection, task_id: str) -> dict[str, Any] | None:
    task = conn.execute(select(Task.__table__).where(Task.id == task_id)).mappings().first()
    if task is None:
        return None
    rounds = conn.execute(select(Round.__table__).where(Round.task_id == task_id).order_by(Round.seq)).mappings().all()
    messages = messages_of_rounds(conn, [r["id"] for r in rounds])
    events = conn.execute(
        select(CallbackEvent.__table__).where(CallbackEvent.task_id == task_id).order_by(CallbackEvent.id)
    ).mappings().all()
    failures = conn.execute(
        select(FailedRequest.__table__).where(FailedRequest.task_id == task_id).order_by(FailedRequest.id)
    ).mappings().all()
    summary = conn.execute(select(Summary.__table__).where(Summary.task_id == task_id)).mappings().first()
    # A metric event (906) may come before the 903 that ties its RoundId to our round.
    by_trtc_round = {r["trtc_round_id"]: r["id"] for r in rounds if r["trtc_round_id"]}
    round_of = {e["id"]: e["round_id"] or by_trtc_round.get(e["trtc_round_id"]) for e in events}
    return {
        **_task(task),
        # The rolling summary of the rounds that left the history window (`memory.summary`).
        "summary": None if summary is None or not (summary["through_seq"] or summary["stale"]) else {
            "text": summary["text"],
            "through_seq": summary["through_seq"],
            "stale": bool(summary["stale"]),
            "updated_at": as_utc(summary["updated_at"]).isoformat(),
        },
        # Whose memory the task reads and adds to (`memory.per_user`).
        "user_memory": None if summary is None or summary["user_app"] is None else _task_user_memory(conn, summary),
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
                "extra_fields": r["extra_fields"],
                "started_at": as_utc(r["created_at"]).isoformat(),
                "finished_at": as_utc(r["finished_at"]).isoformat() if r["finished_at"] else None,
                "first_token_ms": r["first_token_ms"],
                "total_ms": r["total_ms"],
                "error": r["error"],
                "messages": messages[r["id"]],
                # The knowledge passages the round gave the model (base, document, chunk, score).
                "knowledge": r["knowledge"],
                # The fast reply's line the reply began with (it is in the messages too).
                "fast_reply": r["fast_reply"],
                # What the user did not hear (event 905 cut it from the stored reply).
                "unheard": r["unheard"],
                "orchestrator_metrics": _metrics([e for e in events if round_of[e["id"]] == r["id"]]),
                "events": [_event(e) for e in events if round_of[e["id"]] == r["id"]],
            }
            for r in rounds
        ],
        "failed_requests": [
            {
                "request_id": f["request_id"],
                "code": f["code"],
                "message": f["message"],
                "occurred_at": as_utc(f["occurred_at"]).isoformat(),
            }
            for f in failures
        ],
        "events": [_event(e) for e in events if round_of[e["id"]] is None],
    }


def _metrics(events: list[Any]) -> dict[str, Any]:
    """The orchestrator's metrics of a round (event 906: `llm_first_token`, `tts_first_frame_latency`, ...)."""
    out: dict[str, Any] = {}
    for event in events:
        payload = (event["body"].get("EventInfo") or {}).get("Payload") or {}
        if event["event_type"] == METRIC and isinstance(payload.get("Metric"), str):
            out[payload["Metric"]] = payload.get("Value")
    return out


def _event(event: Any) -> dict[str, Any]:
    return {
        "event_type": event["event_type"],
        "trtc_round_id": event["trtc_round_id"],
        "event_ms_ts": event["event_ms_ts"],
        "payload": (event["body"].get("EventInfo") or {}).get("Payload"),
        "received_at": as_utc(event["received_at"]).isoformat(),
    }


PERCENTILES = (0.5, 0.9, 0.99)


def stats(conn: Connection, since: datetime, until: datetime) -> dict[str, Any]:
    """Rounds, outcomes and the proxy's time to first token and total time per hour (UTC), and
    over the whole range. Percentiles are nearest-rank (`percentile_disc` on PostgreSQL, the
    same rule in Python on SQLite), so both databases give the same numbers."""
    since, until = as_utc(since), as_utc(until)
    dialect = conn.dialect.name
    hour = _hour(dialect, Round.created_at)
    in_range = (Round.created_at >= since, Round.created_at < until, Round.status != ROUND_PENDING, Round.seq > 0)
    counted = (
        func.count().label("rounds"),
        func.sum(case((and_(Round.status == ROUND_COMPLETED, Round.error.is_(None)), 1), else_=0)).label("completed"),
        func.sum(case((and_(Round.status == ROUND_INTERRUPTED, Round.error.is_(None)), 1), else_=0)).label("interrupted"),
        func.sum(case((Round.error.is_not(None), 1), else_=0)).label("upstream_error"),
    )
    hours: dict[str, dict[str, Any]] = {}
    for row in conn.execute(select(hour.label("hour"), *counted).where(*in_range).group_by(hour)).mappings():
        hours[_hour_key(row["hour"])] = _counts(row)
    failed_hour = _hour(dialect, FailedRequest.occurred_at)
    failed = conn.execute(
        select(failed_hour, func.count())
        .where(FailedRequest.occurred_at >= since, FailedRequest.occurred_at < until)
        .group_by(failed_hour)
    ).all()
    for key, count in failed:
        hours.setdefault(_hour_key(key), _counts(None))["outcomes"]["failed"] = count
    for key, timings in _percentiles(conn, hour, in_range).items():
        hours.setdefault(key, _counts(None)).update(timings)
    total = _counts(conn.execute(select(*counted).where(*in_range)).mappings().one())
    total["outcomes"]["failed"] = sum(count for _key, count in failed)
    total.update(_percentiles(conn, None, in_range).get("", _no_timings()))
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "total": total,
        "hours": [{"hour": key, **_no_timings(), **hours[key]} for key in sorted(hours)],
    }


def _hour(dialect: str, column: Any) -> Any:
    if dialect == "postgresql":
        return func.date_trunc("hour", func.timezone("UTC", column))
    return func.strftime("%Y-%m-%d %H:00:00", column)


def _hour_key(value: Any) -> str:
    """An hour as ISO 8601 in UTC, from either database's hour expression."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return as_utc(moment).isoformat()


def _counts(row: Any) -> dict[str, Any]:
    def get(name: str) -> int:
        return int(row[name] or 0) if row is not None else 0

    outcomes = {name: get(name) for name in ("completed", "interrupted", "upstream_error")}
    return {"rounds": get("rounds"), "outcomes": {**outcomes, "failed": 0}}


def _no_timings() -> dict[str, Any]:
    empty = {f"p{round(p * 100)}": None for p in PERCENTILES}
    return {"first_token_ms": dict(empty), "total_ms": dict(empty)}


def _percentiles(conn: Connection, hour: Any | None, in_range: tuple[Any, ...]) -> dict[str, dict[str, Any]]:
    """Percentiles of both timings, by hour key ("" for the whole range when `hour` is None)."""
    names = [f"p{round(p * 100)}" for p in PERCENTILES]
    out: dict[str, dict[str, Any]] = {}
    if conn.dialect.name == "postgresql":
        columns = [
            func.percentile_disc(p).within_group(column).label(f"{metric}_{name}")
            for metric, column in (("first_token_ms", Round.first_token_ms), ("total_ms", Round.total_ms))
            for p, name in zip(PERCENTILES, names)
        ]
        query = select(*([hour.label("hour")] if hour is not None else []), *columns).where(*in_range)
        for row in conn.execute(query.group_by(hour) if hour is not None else query).mappings():
            key = _hour_key(row["hour"]) if hour is not None else ""
            out[key] = {
                metric: {name: row[f"{metric}_{name}"] for name in names} for metric in ("first_token_ms", "total_ms")
            }
        return out
    values: dict[str, dict[str, list[int]]] = {}
    query = select(hour if hour is not None else literal(""), Round.first_token_ms, Round.total_ms).where(*in_range)
    for key, first_token, total in conn.execute(query):
        bucket = values.setdefault(_hour_key(key) if hour is not None else "", {"first_token_ms": [], "total_ms": []})
        if first_token is not None:
            bucket["first_token_ms"].append(first_token)
        if total is not None:
            bucket["total_ms"].append(total)
    for key, bucket in values.items():
        out[key] = {
            metric: {name: _nearest_rank(sorted(series), p) for p, name in zip(PERCENTILES, names)}
            for metric, series in bucket.items()
        }
    return out


def _nearest_rank(ordered: list[int], p: float) -> int | None:
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]
