"""The SQL of rolling summaries. One process folds a task's rounds at a time: it holds the row as
`writer` until `writer_until`, renewed with every write; a crashed writer's hold runs out and
another takes over from the last summary written."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from llm_proxy.context import Msg
from llm_proxy.models import FINISHED_STATUSES, Round
from llm_proxy.store import messages_of_rounds
from memory.models import Summary

# How long a writer holds a task's summary without writing.
HOLD_S = 120.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def read(conn: Connection, task_id: str) -> str | None:
    """The task's summary text, if one was written (a stale one too: better than none while it
    is redone)."""
    text = conn.execute(select(Summary.text).where(Summary.task_id == task_id)).scalar()
    return text or None


def take(conn: Connection, task_id: str, writer: str) -> tuple[int, str] | None:
    """Become the task's summary writer: the summary so far (through which round, its text), or
    None while another process holds it. A stale summary starts again from nothing."""
    now = _now()
    insert = (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(Summary)
    conn.execute(
        insert.values(task_id=task_id, through_seq=0, text="", updated_at=now).on_conflict_do_nothing(
            index_elements=[Summary.task_id]
        )
    )
    row = conn.execute(
        update(Summary)
        .where(
            Summary.task_id == task_id,
            or_(Summary.writer.is_(None), Summary.writer == writer, Summary.writer_until < now),
        )
        .values(writer=writer, writer_until=now + timedelta(seconds=HOLD_S))
        .returning(Summary.through_seq, Summary.text, Summary.stale)
    ).first()
    if row is None:
        return None
    if row.stale:
        conn.execute(update(Summary).where(Summary.task_id == task_id).values(through_seq=0, text="", stale=False))
        return 0, ""
    return row.through_seq, row.text


def rounds_after(conn: Connection, task_id: str, after_seq: int, up_to_seq: int, limit: int) -> list[tuple[int, list[Msg]]]:
    """The task's finished rounds after `after_seq` up to `up_to_seq`, oldest first, with their
    stored messages (what was heard: a 905 cut them)."""
    rows = conn.execute(
        select(Round.id, Round.seq)
        .where(Round.task_id == task_id, Round.seq > after_seq, Round.seq <= up_to_seq, Round.status.in_(FINISHED_STATUSES))
        .order_by(Round.seq)
        .limit(limit)
    ).all()
    messages = messages_of_rounds(conn, [row.id for row in rows])
    return [(row.seq, messages[row.id]) for row in rows]


def write(conn: Connection, task_id: str, writer: str, through_seq: int, text: str) -> bool:
    """Store the summary as of `through_seq`, if this process still holds it and no round it
    covers changed meanwhile (False: redo)."""
    now = _now()
    written = conn.execute(
        update(Summary)
        .where(Summary.task_id == task_id, Summary.writer == writer, Summary.stale.is_(False))
        .values(through_seq=through_seq, text=text, updated_at=now, writer_until=now + timedelta(seconds=HOLD_S))
        .returning(Summary.task_id)
    ).first()
    return written is not None


def release(conn: Connection, task_id: str, writer: str) -> None:
    conn.execute(update(Summary).where(Summary.task_id == task_id, Summary.writer == writer).values(writer=None, writer_until=None))


def mark_stale(conn: Connection, task_id: str, round_id: str) -> None:
    """A round changed (a 905 cut it): a summary that covers it is redone."""
    seq: Any = select(Round.seq).where(Round.id == round_id).scalar_subquery()
    conn.execute(update(Summary).where(Summary.task_id == task_id, Summary.through_seq >= seq).values(stale=True))
