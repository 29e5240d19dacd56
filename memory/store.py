"""The SQL of memory. One process folds a task's rounds at a time (into its summary, or into its
user's memory): it holds the task's summary row as `writer` until `writer_until`, renewed with
every write; a crashed writer's hold runs out and another takes over from the last text written.

A user's memory is written only in a transaction that still finds its task's row held by the
writer: a user deleted meanwhile (tasks first, then memories) never has it written again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from llm_proxy.context import Msg
from llm_proxy.memory_context import MemoryView, UserKey
from llm_proxy.models import FINISHED_STATUSES, Round, Task
from llm_proxy.store import messages_of_rounds
from memory.models import Summary, UserMemory

# How long a writer holds a task's summary without writing.
HOLD_S = 120.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _insert(conn: Connection) -> Any:
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert


def view(conn: Connection, task_id: str, user: UserKey | None, model: str) -> MemoryView:
    """What the task's rounds carry from memory. A task of a known user (`per_user`) records
    whose it is, and a copy of their memory, at its first round that names them: every later
    round carries the same copy, however the memory changes meanwhile."""
    columns = (Summary.through_seq, Summary.text, Summary.stale, Summary.user_app, Summary.user_memory)
    row = conn.execute(select(*columns).where(Summary.task_id == task_id)).first()
    if user is not None and (row is None or row.user_app is None):
        remembered = user_memory(conn, user)
        mine = {"user_app": user.sdk_app_id, "user_profile": user.profile, "user_id": user.user_id,
                "user_memory": remembered[0] if remembered else None, "model": model[:256]}
        conn.execute(
            _insert(conn)(Summary)
            .values(task_id=task_id, through_seq=0, text="", updated_at=_now(), **mine)
            .on_conflict_do_update(index_elements=[Summary.task_id], set_=mine, where=Summary.user_app.is_(None))
        )
        row = conn.execute(select(*columns).where(Summary.task_id == task_id)).first()
    if row is None:
        return MemoryView()
    return MemoryView(row.through_seq, row.text or None, bool(row.stale), row.user_memory or None)


def take(conn: Connection, task_id: str, writer: str) -> tuple[int, str] | None:
    """Become the task's summary writer: the summary so far (through which round, its text), or
    None while another process holds it (or the task is gone). A stale summary starts again from
    nothing. The row is made on the first fold only: usually this is one statement."""
    now = _now()
    hold = (
        update(Summary)
        .where(
            Summary.task_id == task_id,
            or_(Summary.writer.is_(None), Summary.writer == writer, Summary.writer_until < now),
        )
        .values(writer=writer, writer_until=now + timedelta(seconds=HOLD_S))
        .returning(Summary.through_seq, Summary.text, Summary.stale)
    )
    row = conn.execute(hold).first()
    if row is None:
        if conn.execute(select(Summary.task_id).where(Summary.task_id == task_id)).first() is not None:
            return None  # another process holds it
        if conn.execute(select(Task.id).where(Task.id == task_id)).first() is None:
            return None  # deleted since the fold was asked for
        conn.execute(
            _insert(conn)(Summary).values(task_id=task_id, through_seq=0, text="", updated_at=now)
            .on_conflict_do_nothing(index_elements=[Summary.task_id])
        )
        row = conn.execute(hold).first()
        if row is None:
            return None
    if row.stale:
        conn.execute(update(Summary).where(Summary.task_id == task_id).values(through_seq=0, text="", stale=False))
        return 0, ""
    return row.through_seq, row.text


def take_batch(
    conn: Connection, task_id: str, writer: str, up_to_seq: int, limit: int
) -> tuple[int, str, list[tuple[int, list[Msg]]]] | None:
    """`take`, and the first batch of rounds to fold, in one transaction."""
    taken = take(conn, task_id, writer)
    if taken is None:
        return None
    return taken[0], taken[1], rounds_after(conn, task_id, taken[0], up_to_seq, limit)


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


def write(conn: Connection, task_id: str, writer: str, through_seq: int, text: str, *, release: bool = False) -> bool:
    """Store the summary as of `through_seq`, if this process still holds it and no round it
    covers changed meanwhile (False: redo); `release`: and let go of the hold (the last batch)."""
    now = _now()
    hold: dict[str, Any] = {"writer": None, "writer_until": None} if release else {"writer_until": now + timedelta(seconds=HOLD_S)}
    written = conn.execute(
        update(Summary)
        .where(Summary.task_id == task_id, Summary.writer == writer, Summary.stale.is_(False))
        .values(through_seq=through_seq, text=text, updated_at=now, **hold)
        .returning(Summary.task_id)
    ).first()
    return written is not None


def release(conn: Connection, task_id: str, writer: str) -> None:
    conn.execute(update(Summary).where(Summary.task_id == task_id, Summary.writer == writer).values(writer=None, writer_until=None))


def mark_stale(conn: Connection, task_id: str, round_id: str) -> None:
    """A round changed (a 905 cut it): a summary that covers it is redone."""
    seq: Any = select(Round.seq).where(Round.id == round_id).scalar_subquery()
    conn.execute(update(Summary).where(Summary.task_id == task_id, Summary.through_seq >= seq).values(stale=True))


# Per-user memory.


def user_memory(conn: Connection, user: UserKey) -> tuple[str, int] | None:
    """The user's memory and its version, if any."""
    row = conn.execute(
        select(UserMemory.text, UserMemory.version).where(
            UserMemory.sdk_app_id == user.sdk_app_id, UserMemory.profile == user.profile, UserMemory.user_id == user.user_id
        )
    ).first()
    return (row.text, row.version) if row else None


@dataclass(frozen=True)
class UserFold:
    """A task taken to fold its rounds `after_seq` < seq <= `up_to_seq` into its user's memory."""

    user: UserKey
    after_seq: int
    up_to_seq: int
    model: str


def take_for_user(conn: Connection, task_id: str, writer: str) -> UserFold | None:
    """Become the writer of the task's rows for its user's memory; None while another process
    holds it, or when the task has no user or nothing new."""
    now = _now()
    row = conn.execute(
        update(Summary)
        .where(
            Summary.task_id == task_id,
            Summary.user_app.is_not(None),
            or_(Summary.writer.is_(None), Summary.writer == writer, Summary.writer_until < now),
        )
        .values(writer=writer, writer_until=now + timedelta(seconds=HOLD_S))
        .returning(Summary.user_app, Summary.user_profile, Summary.user_id, Summary.user_folded_seq, Summary.model)
    ).first()
    if row is None:
        return None
    last_seq = conn.execute(select(Task.last_seq).where(Task.id == task_id)).scalar() or 0
    user = UserKey(row.user_app, row.user_profile or "", row.user_id or "")
    return UserFold(user, row.user_folded_seq, last_seq, row.model or "")


class MemoryMoved(Exception):
    """The user's memory changed since it was read (another task of theirs was folded into it)."""


def write_user_memory(conn: Connection, task_id: str, writer: str, fold: UserFold, through_seq: int, text: str,
                      version: int | None) -> int | None:
    """Store the user's memory as folded from the task's rounds up to `through_seq`, over the
    `version` read (None: there was none); the new version, or None when the writer lost the
    task (a crash hold ran out, or the task was deleted). `MemoryMoved`: read it again and redo."""
    now = _now()
    held = conn.execute(
        update(Summary)
        .where(Summary.task_id == task_id, Summary.writer == writer)
        .values(user_folded_seq=through_seq, writer_until=now + timedelta(seconds=HOLD_S))
        .returning(Summary.task_id)
    ).first()
    if held is None:
        return None
    user = fold.user
    key = (UserMemory.sdk_app_id == user.sdk_app_id, UserMemory.profile == user.profile, UserMemory.user_id == user.user_id)
    if version is None:
        written = conn.execute(
            _insert(conn)(UserMemory)
            .values(sdk_app_id=user.sdk_app_id, profile=user.profile, user_id=user.user_id, text=text, version=1,
                    created_at=now, updated_at=now)
            .on_conflict_do_nothing()
            .returning(UserMemory.version)
        ).scalar()
    else:
        written = conn.execute(
            update(UserMemory).where(*key, UserMemory.version == version)
            .values(text=text, version=version + 1, updated_at=now).returning(UserMemory.version)
        ).scalar()
    if written is None:
        raise MemoryMoved()  # rolls back the task's mark with it
    return int(written)


def mark_user_folded(conn: Connection, task_id: str, writer: str, through_seq: int) -> None:
    """Rounds up to `through_seq` need no folding (none of them finished with words to keep)."""
    conn.execute(
        update(Summary).where(Summary.task_id == task_id, Summary.writer == writer, Summary.user_folded_seq < through_seq)
        .values(user_folded_seq=through_seq)
    )


def due_user_folds(conn: Connection, idle_before: datetime, limit: int) -> list[str]:
    """Tasks with rounds not in their user's memory yet, that ended (902) or went idle, and that
    no process holds now."""
    now = _now()
    return list(
        conn.execute(
            select(Summary.task_id)
            .join(Task, Task.id == Summary.task_id)
            .where(
                Summary.user_app.is_not(None),
                Task.last_seq > Summary.user_folded_seq,
                or_(Task.ended_at.is_not(None), Task.updated_at < idle_before),
                or_(Summary.writer.is_(None), Summary.writer_until < now),
            )
            .limit(limit)
        ).scalars()
    )


def delete_memories(conn: Connection, sdk_app_id: str, user_id: str) -> int:
    """The user's memory in every profile (after their tasks are gone); how many there were."""
    gone = conn.execute(
        delete(UserMemory).where(UserMemory.sdk_app_id == sdk_app_id, UserMemory.user_id == user_id).returning(UserMemory.profile)
    ).all()
    return len(gone)


def purge_memories(conn: Connection, cutoff: datetime, limit: int) -> int:
    """One batch of retention: memories no task of their user added to since `cutoff` (checked
    again in the delete, so a memory just written stays)."""
    key = (UserMemory.sdk_app_id, UserMemory.profile, UserMemory.user_id)
    expired = conn.execute(select(*key).where(UserMemory.updated_at < cutoff).order_by(UserMemory.updated_at).limit(limit)).all()
    if not expired:
        return 0
    gone = conn.execute(
        delete(UserMemory).where(tuple_(*key).in_([tuple(row) for row in expired]), UserMemory.updated_at < cutoff)
        .returning(UserMemory.profile)
    ).all()
    return len(gone)
