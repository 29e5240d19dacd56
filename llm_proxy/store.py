"""Round storage in SQL: claiming a round in order, the history window, finishing a round.

Ordering across processes comes from the database: a round takes its sequence number with an
upsert on the task row, which holds that row's lock (PostgreSQL) or the write lock (SQLite,
`BEGIN IMMEDIATE`) until the claim commits. A round then waits for every earlier round of its task
that is still pending before it reads the history, so its context includes them.

Each function is one short transaction, run by `Database.run` (on PostgreSQL a new round is
claimed in a single statement instead, `claim_new_round`); no connection is held while the
upstream streams. Every change to a task's stored rounds bumps `tasks.version` (taking the task
row first, so it queues behind a claim), which is what lets `HistoryCache` trust its copy; a
change to a finished round also bumps `tasks.edits`, and while that stays the same, a copy that
fell behind is brought up to date by reading only the rounds added since.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from typing import Any, NamedTuple, Sequence

from sqlalchemy import JSON, and_, bindparam, column, delete, func, insert, literal, null, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from llm_proxy.context import Msg, StoredRound, message_tokens, replayed_reply
from llm_proxy.models import (
    FINISHED_STATUSES,
    ROUND_COMPLETED,
    ROUND_INTERRUPTED,
    ROUND_PENDING,
    FailedRequest,
    Message,
    Round,
    Task,
)


@dataclass(frozen=True)
class TaskInfo:
    """The orchestrator's identification of one request (its `X-*` headers), and the profile
    that answers it: with the app id, the task's owner."""

    task_id: str
    request_id: str | None = None
    sdk_app_id: str | None = None
    user_id: str | None = None
    room_id: str | None = None
    room_id_type: str | None = None
    profile: str | None = None
    # The profile's opening words, which a new task gets as its round 0 (`_open_with_welcome`).
    welcome: str | None = None


class TaskOwnedElsewhere(Exception):
    """The task id belongs to another profile or app: its history is not this request's to see
    or change."""


class RequestIdReused(Exception):
    """The request id already names a round of the task with other words: it is not a retry."""


@dataclass(frozen=True)
class RoundTiming:
    """What operators see of a finished round besides its messages."""

    first_token_ms: int | None = None
    total_ms: int | None = None
    # The upstream's error code, when it failed mid-reply.
    error: str | None = None
    # The knowledge passages the round gave the model (base, document, chunk, score).
    knowledge: list[dict[str, Any]] | None = None
    # The fast reply's line said before the model's answer (`fast_reply`): part of the reply.
    fast_reply: str | None = None


@dataclass(frozen=True)
class Failure:
    """Why a request failed before its round had an answer."""

    code: str
    message: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class HistoryCopy:
    """What a process's copy of a task's history holds: every finished round up to `through_seq`
    as of the task's `version` and `edits`."""

    version: int
    through_seq: int
    edits: int


@dataclass
class Claim:
    task_id: str
    round_id: str
    seq: int
    # The task's version and edit count when the claim committed.
    version: int = 0
    edits: int = 0
    # A new round's first messages (the user's turn), stored with the claim so that a crash keeps
    # what the user said; the finish adds the rest.
    head_stored: int = 0
    # How many leading messages of the request's turn the task already held, as the user turns
    # of its latest rounds that got no reply (`repeated_turns`): they are neither stored nor sent
    # again.
    repeated: int = 0
    # An existing round taken up again: a retry of an interrupted round (answered again in place)
    # or the client's tool results continuing the round that called its tools. Its messages as
    # stored, and the status it goes back to if the new attempt fails.
    reopened_status: str | None = None
    stored: list[Msg] = field(default_factory=list)
    # A retry of a completed round: its last assistant message, sent again without the upstream.
    replay: Msg | None = None
    replay_usage: dict[str, int] | None = None
    # A retry whose first attempt is still pending: wait for it, then claim again.
    in_flight: bool = False
    # Earlier rounds of the task still pending when this one was claimed.
    pending_before: list[str] = field(default_factory=list)
    # Finished rounds before this one, newest first (at most `max_rounds`), read in the claim's
    # own transaction; None when the caller's copy is current (`known`) or rounds are pending.
    history: list[StoredRound] | None = None
    # Or, when the caller's copy is only missing rounds added since (by other processes): those
    # rounds, newest first, the ones after seq `newer_after`.
    newer: list[StoredRound] | None = None
    newer_after: int = 0

    @property
    def is_new_work(self) -> bool:
        """The claim holds a pending round that must be finished or released."""
        return self.replay is None and not self.in_flight

    @property
    def regenerate(self) -> bool:
        return self.reopened_status == ROUND_INTERRUPTED


def _now() -> datetime:
    return datetime.now(timezone.utc)


def first_edits() -> int:
    """A new task row's edit count: random, so that a copy of a deleted task's history, still
    held by some process, never matches the task made again under its id (the copy is checked
    against the task's version and edits, which a new task would otherwise reach again)."""
    return secrets.randbelow(1 << 30)


def claim_round(
    conn: Connection,
    task: TaskInfo,
    *,
    max_rounds: int,
    owner: str | None = None,
    head: Sequence[Msg] = (),
    known: HistoryCopy | None = None,
    take_over_pending: bool = False,
    continue_round: bool = False,
) -> Claim | None:
    """Take the task's next sequence number for a new round (stored pending, owned by `owner`,
    with its `head` messages), or find the round this request retries (or, with
    `continue_round`, the task's last round, to add the client's tool results to it); then read
    the history window, unless an earlier round is still pending. With the caller's copy of the
    history (`known`) it reads nothing when the copy is current, and only the rounds after it
    when rounds were only added since. None: nothing to continue."""
    if continue_round:
        claim = _reopen_last(conn, task, owner)
        if claim is None:
            return None
        claim.pending_before, claim.history = _window(conn, task.task_id, claim.seq, max_rounds)
        return claim
    statements = _statements(conn.dialect.name)
    now = _now()
    bumped = conn.execute(
        statements.next_seq,
        {
            "id": task.task_id,
            "profile": task.profile,
            "sdk_app_id": task.sdk_app_id,
            "user_id": task.user_id,
            "room_id": task.room_id,
            "room_id_type": task.room_id_type,
            "last_seq": 1,
            "version": 0,
            "edits": first_edits(),
            "created_at": now,
            "updated_at": now,
        },
    ).first()
    if bumped is None:
        raise TaskOwnedElsewhere(task.task_id)
    seq, version, edits = bumped
    repeated = repeated_turns(conn, task.task_id, seq, head)
    round_id = uuid.uuid4().hex
    rows = message_rows(round_id, head[repeated:])
    inserted = conn.execute(
        statements.insert_round,
        {
            "id": round_id,
            "task_id": task.task_id,
            "seq": seq,
            "request_id": task.request_id,
            "status": ROUND_PENDING,
            "owner": owner,
            "interrupted": False,
            "tokens": sum(row["tokens"] for row in rows),
            "created_at": now,
        },
    )
    if inserted.first() is not None:
        if rows:
            conn.execute(_INSERT_MESSAGES, rows)
        _open_with_welcome(conn, task, seq, now)
        claim = Claim(task.task_id, round_id, seq, version, edits, head_stored=len(rows), repeated=repeated)
        return _new_round(conn, claim, known, max_rounds)
    # The same request id was seen before: this is the orchestrator retrying. It takes no new
    # sequence number: the one just taken is given back (the task row stays locked until commit,
    # so nobody took a later one).
    conn.execute(_UNBUMP_SEQ, {"task_id": task.task_id})
    claim = _claim_retry(conn, task, owner, take_over_pending, head)
    if claim.is_new_work:
        _read_window(conn, claim, max_rounds)
    return claim


def claim_new_round(
    conn: Connection,
    task: TaskInfo,
    *,
    max_rounds: int,
    owner: str | None = None,
    head: Sequence[Msg] = (),
    known: HistoryCopy | None = None,
) -> Claim | None:
    """`claim_round` for the common case on PostgreSQL, run outside a transaction
    (`Database.run_autocommit`): the next sequence number, the pending round and its head in one
    statement, one round trip where the transaction took five. The statement holds the task row's
    lock until the round exists, so a later round of the task, claimed anywhere, finds this one
    pending; reading the history after it needs no lock. None: the request id is taken (a retry),
    nothing was claimed (nor a sequence number taken), and the caller claims with `claim_round`,
    whose transaction handles retries."""
    round_id = uuid.uuid4().hex
    rows = message_rows(round_id, head)
    now = _now()
    seq, version, edits, inserted = conn.execute(
        _claim_new_statement(),
        {
            "task_id": task.task_id,
            "profile": task.profile,
            "sdk_app_id": task.sdk_app_id,
            "user_id": task.user_id,
            "room_id": task.room_id,
            "room_id_type": task.room_id_type,
            "now": now,
            "edits": first_edits(),
            "round_id": round_id,
            "request_id": task.request_id,
            "owner": owner,
            "tokens": sum(row["tokens"] for row in rows),
            "head": [_without_round(row) for row in rows],
        },
    ).one()
    if inserted is None:
        return None
    _open_with_welcome(conn, task, seq, now)
    claim = Claim(task.task_id, round_id, seq, version, edits, head_stored=len(rows))
    return _new_round(conn, claim, known, max_rounds)


WELCOME = "welcome"


def _open_with_welcome(conn: Connection, task: TaskInfo, seq: int, now: datetime) -> None:
    """With the first round of a task whose profile has opening words (the task's
    `WelcomeMessage`, which the orchestrator speaks itself), its round 0 with them, so that the
    model knows it said them. The first round may be claimed again (after a failed upstream):
    the first round 0 stays."""
    if seq != 1 or not task.welcome:
        return
    message = {"role": "assistant", "content": task.welcome}
    round_id = uuid.uuid4().hex
    inserted = conn.execute(
        _statements(conn.dialect.name).insert_welcome,
        {
            "id": round_id,
            "task_id": task.task_id,
            "seq": 0,
            "status": ROUND_COMPLETED,
            "interrupted": False,
            "tokens": message_tokens(message),
            "profile": task.profile,
            "finish_reason": WELCOME,
            "created_at": now,
            "finished_at": now,
        },
    ).first()
    if inserted is not None:
        conn.execute(_INSERT_MESSAGES, message_rows(round_id, [message]))


def _new_round(conn: Connection, claim: Claim, known: HistoryCopy | None, max_rounds: int) -> Claim:
    """A newly claimed round, with the history its caller's copy lacks (nothing, if current)."""
    if known is not None and known.edits == claim.edits and known.through_seq < claim.seq:
        if known.version == claim.version and known.through_seq == claim.seq - 1:
            return claim
        claim.pending_before, newer = _window(conn, claim.task_id, claim.seq, max_rounds, after_seq=known.through_seq)
        if not claim.pending_before:
            claim.newer, claim.newer_after = newer, known.through_seq
        return claim
    _read_window(conn, claim, max_rounds)
    return claim


def _read_window(conn: Connection, claim: Claim, max_rounds: int) -> None:
    claim.pending_before, history = _window(conn, claim.task_id, claim.seq, max_rounds)
    if not claim.pending_before:
        claim.history = history


@dataclass(frozen=True)
class _Statements:
    next_seq: Any
    insert_round: Any
    insert_welcome: Any


@cache
def _statements(dialect_name: str) -> _Statements:
    """The claim's statements, built once per dialect: building and cache-keying them on every
    request cost about as much as running them."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    upsert = dialect.insert(Task)
    next_seq = upsert.on_conflict_do_update(
        index_elements=[Task.id], set_=_task_bump(upsert.excluded), where=_same_owner(upsert.excluded.profile, upsert.excluded.sdk_app_id)
    ).returning(Task.last_seq, Task.version, Task.edits)
    insert_round = (
        dialect.insert(Round)
        .on_conflict_do_nothing(index_elements=[Round.task_id, Round.request_id])
        .returning(Round.id)
    )
    insert_welcome = (
        dialect.insert(Round).on_conflict_do_nothing(index_elements=[Round.task_id, Round.seq]).returning(Round.id)
    )
    return _Statements(next_seq, insert_round, insert_welcome)


@cache
def _claim_new_statement() -> Any:
    """PostgreSQL: the task upsert and the round insert as one statement (data-modifying CTEs).
    `inserted` is null when the round's request id was already taken."""
    upsert = (
        postgresql.insert(Task)
        .values(
            id=bindparam("task_id", type_=Task.id.type),
            profile=bindparam("profile", type_=Task.profile.type),
            sdk_app_id=bindparam("sdk_app_id", type_=Task.sdk_app_id.type),
            user_id=bindparam("user_id", type_=Task.user_id.type),
            room_id=bindparam("room_id", type_=Task.room_id.type),
            room_id_type=bindparam("room_id_type", type_=Task.room_id_type.type),
            last_seq=1,
            version=0,
            edits=bindparam("edits", type_=Task.edits.type),
            created_at=bindparam("now", type_=Task.created_at.type),
            updated_at=bindparam("now", type_=Task.updated_at.type),
        )
    )
    # A retry (its request id already has a round) takes no sequence number. Two attempts racing
    # with one request id can still both take one; the loser's stays unused (gaps are harmless).
    retry = (
        select(Round.id)
        .where(Round.task_id == bindparam("task_id"), Round.request_id == bindparam("request_id"))
        .exists()
    )
    # A task of another owner is not touched either: `claim_round` then says why.
    task = upsert.on_conflict_do_update(
        index_elements=[Task.id], set_=_task_bump(upsert.excluded), where=and_(~retry, _same_owner(upsert.excluded.profile, upsert.excluded.sdk_app_id))
    ).returning(Task.last_seq, Task.version, Task.edits).cte("task")
    new_round = (
        postgresql.insert(Round)
        .from_select(
            ["id", "task_id", "seq", "request_id", "status", "owner", "interrupted", "tokens", "created_at"],
            select(
                bindparam("round_id", type_=Round.id.type),
                bindparam("task_id", type_=Round.task_id.type),
                task.c.last_seq,
                bindparam("request_id", type_=Round.request_id.type),
                literal(ROUND_PENDING, Round.status.type),
                bindparam("owner", type_=Round.owner.type),
                literal(False, Round.interrupted.type),
                bindparam("tokens", type_=Round.tokens.type),
                bindparam("now", type_=Round.created_at.type),
            ),
        )
        .on_conflict_do_nothing(index_elements=[Round.task_id, Round.request_id])
        .returning(Round.id)
        .cte("new_round")
    )
    given = _given_messages("head")
    head = (
        insert(Message)
        .from_select(
            ["round_id", *_MESSAGE_COLUMNS],
            select(new_round.c.id, *(given.c[name] for name in _MESSAGE_COLUMNS)).select_from(new_round.join(given, true())),
        )
        .cte("head")
    )
    # Committed without waiting for the WAL flush (`SET LOCAL`, for this statement only): the
    # wait was the larger part of the claim. A PostgreSQL crash can then lose a claim only of a
    # round that is still streaming, which the crash ends anyway; a finished round's commit is
    # flushed, and with it every claim before it.
    no_flush = select(func.set_config("synchronous_commit", "off", True).label("setting")).cte("no_flush")
    return select(
        select(task.c.last_seq).scalar_subquery().label("last_seq"),
        select(task.c.version).scalar_subquery().label("version"),
        select(task.c.edits).scalar_subquery().label("edits"),
        select(new_round.c.id).scalar_subquery().label("inserted"),
    ).select_from(no_flush).add_cte(head)


def _task_bump(excluded: Any) -> dict[str, Any]:
    """The claim's update of an existing task row (of the same owner): the next sequence number;
    the app and user as first given (a later X-User-Id never moves the task to another user),
    the room where the request names one."""
    return {
        "last_seq": Task.last_seq + 1,
        "updated_at": excluded.updated_at,
        "profile": excluded.profile,
        "sdk_app_id": func.coalesce(Task.sdk_app_id, excluded.sdk_app_id),
        "user_id": func.coalesce(Task.user_id, excluded.user_id),
        "room_id": func.coalesce(excluded.room_id, Task.room_id),
        "room_id_type": func.coalesce(excluded.room_id_type, Task.room_id_type),
        # A round after the orchestrator's 902 opens the task again.
        "ended_at": null(),
        "leave_code": null(),
    }


def _same_owner(profile: Any, sdk_app_id: Any) -> Any:
    """A request of this profile and app (columns of its would-be row, or parameters) may use the
    stored task: the same profile (a task stored before owners were kept is adopted), and no other
    X-Sdk-App-Id (a request without one is the profile's own: its key is the boundary, as any
    holder of it may send any header)."""
    return and_(
        or_(Task.profile.is_(None), Task.profile == profile),
        or_(Task.sdk_app_id.is_(None), sdk_app_id.is_(None), Task.sdk_app_id == sdk_app_id),
    )


def _check_owner(conn: Connection, task: TaskInfo) -> None:
    """`_same_owner` for a statement that takes an existing task without the upsert."""
    same = _same_owner(literal(task.profile, Task.profile.type), literal(task.sdk_app_id, Task.sdk_app_id.type))
    row = conn.execute(select(same).where(Task.id == task.task_id)).first()
    if row is not None and not row[0]:  # SQLite answers 0 or 1, PostgreSQL false or true
        raise TaskOwnedElsewhere(task.task_id)


def may_repeat(head: Sequence[Msg]) -> bool:
    """Whether a turn may repeat earlier user turns (`repeated_turns`): it has more than one."""
    return sum(1 for message in head if message["role"] == "user") > 1


def repeated_turns(conn: Connection, task_id: str, before_seq: int, head: Sequence[Msg]) -> int:
    """How many leading messages of `head` are the user turns of the task's latest rounds before
    `before_seq` that got no reply (abandoned before the first word, or still pending). The
    orchestrator's own record (with `History` > 0) holds those turns after the last thing the
    bot said, so it sends them again with the new one; the store already has them."""
    if not may_repeat(head):
        return 0
    rounds = conn.execute(
        select(Round.id).where(Round.task_id == task_id, Round.seq < before_seq).order_by(Round.seq.desc()).limit(len(head) - 1)
    ).scalars().all()
    by_round = messages_of_rounds(conn, list(rounds))
    unanswered: list[tuple[str, Any]] = []
    for round_id in rounds:  # newest first, up to the last round the bot said something in
        messages = by_round.get(round_id, [])
        if any(m["role"] == "assistant" and (m.get("content") or m.get("tool_calls")) for m in messages):
            break
        unanswered = [(m["role"], m.get("content")) for m in messages if m["role"] == "user"] + unanswered
    given = [(row["role"], row["content"]) for row in message_rows("", head)]
    for count in range(min(len(given) - 1, len(unanswered)), 0, -1):
        if given[:count] == unanswered[-count:]:
            return count
    return 0


def _claim_retry(
    conn: Connection, task: TaskInfo, owner: str | None, take_over_pending: bool, head: Sequence[Msg]
) -> Claim:
    row = conn.execute(
        select(Round.id, Round.seq, Round.status, Round.usage, Task.version, Task.edits)
        .join(Task, Task.id == Round.task_id)
        .where(Round.task_id == task.task_id, Round.request_id == task.request_id)
    ).one()
    stored = _round_messages(conn, row.id)
    repeated = repeated_turns(conn, task.task_id, row.seq, head)
    if not _same_turn(stored, head[repeated:]):
        raise RequestIdReused(task.request_id or "")
    claim = Claim(task.task_id, row.id, row.seq, row.version, row.edits, repeated=repeated)
    if row.status == ROUND_COMPLETED:
        claim.replay = replayed_reply(stored)
        claim.replay_usage = row.usage
    elif row.status == ROUND_PENDING and not take_over_pending:
        claim.in_flight = True
    else:
        claim.version, claim.edits = _reopen(conn, task.task_id, row.id, owner)
        claim.reopened_status = ROUND_INTERRUPTED
        claim.stored = stored
    return claim


def _same_turn(stored: Sequence[Msg], head: Sequence[Msg]) -> bool:
    """A retry brings the words its round was stored with (as stored: without NUL characters)."""
    given = message_rows("", head)
    return [(m["role"], m.get("content")) for m in stored[: len(given)]] == [(r["role"], r["content"]) for r in given]


def _reopen_last(conn: Connection, task: TaskInfo, owner: str | None) -> Claim | None:
    """The task's last round, reopened for the client's tool results, if it is a completed one."""
    _check_owner(conn, task)
    bumped = conn.execute(_BUMP_EDITS, {"task_id": task.task_id}).first()
    if bumped is None:
        return None
    row = conn.execute(
        select(Round.id, Round.seq, Round.status).where(Round.task_id == task.task_id).order_by(Round.seq.desc()).limit(1)
    ).first()
    if row is None or row.status != ROUND_COMPLETED:
        return None
    conn.execute(update(Round).where(Round.id == row.id).values(status=ROUND_PENDING, owner=owner))
    claim = Claim(task.task_id, row.id, row.seq, bumped.version, bumped.edits, reopened_status=ROUND_COMPLETED)
    claim.stored = _round_messages(conn, row.id)
    return claim


def bump_edits(conn: Connection, task_id: str) -> tuple[int, int]:
    """A finished round of the task is about to change: bump the task's version and edit count
    (taking its row first, as every writer of rounds does), so every process's history copy is
    read again; returns both."""
    version, edits = conn.execute(_BUMP_EDITS, {"task_id": task_id}).one()
    return version, edits


def _reopen(conn: Connection, task_id: str, round_id: str, owner: str | None) -> tuple[int, int]:
    """Set a finished round back to pending, which changes what a later round's context waits
    for; returns the task's new version and edit count."""
    bumped = bump_edits(conn, task_id)
    conn.execute(update(Round).where(Round.id == round_id).values(status=ROUND_PENDING, owner=owner))
    return bumped


def _round_messages(conn: Connection, round_id: str) -> list[Msg]:
    rows = conn.execute(
        select(Message.role, Message.content, Message.name, Message.tool_call_id, Message.tool_calls)
        .where(Message.round_id == round_id)
        .order_by(Message.position)
    )
    return [message_from_row(*row) for row in rows]


def load_history(conn: Connection, task_id: str, before_seq: int, *, max_rounds: int) -> list[StoredRound]:
    """Finished rounds before `before_seq`, newest first (at most `max_rounds`)."""
    _pending, history = _window(conn, task_id, before_seq, max_rounds)
    return history


_recent = (
    select(Round.id, Round.seq, Round.tokens, Round.status)
    .where(
        Round.task_id == bindparam("task_id"),
        Round.seq > bindparam("after_seq"),
        Round.seq < bindparam("before_seq"),
    )
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


def _window(
    conn: Connection, task_id: str, before_seq: int, max_rounds: int, *, after_seq: int = -1
) -> tuple[list[str], list[StoredRound]]:
    """The still-pending rounds among the last `max_rounds` between `after_seq` and `before_seq`,
    and the finished ones, newest first, in one query (rounds joined with their messages). A
    pending round further back than that is a dead one (its process crashed) and is not waited
    for."""
    params = {"task_id": task_id, "after_seq": after_seq, "before_seq": before_seq, "limit": max(max_rounds, 1)}
    rows = conn.execute(_WINDOW, params)
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
            finished[-1].messages.append(message_from_row(role, content, name, tool_call_id, tool_calls))
    return pending, finished


def message_from_row(
    role: str, content: str | None, name: str | None, tool_call_id: str | None, tool_calls: Any
) -> Msg:
    """A stored message as a message dict (without the fields it does not have)."""
    message: Msg = {"role": role, "content": content}
    if name is not None:
        message["name"] = name
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return message


class Finished(NamedTuple):
    version: int  # the task's, after this round
    stored: StoredRound
    held: bool  # a 903/905 came while the round was open and waits for it


def finish_round(
    conn: Connection,
    claim: Claim,
    messages: Sequence[Msg],
    *,
    interrupted: bool,
    model: str,
    finish_reason: str | None,
    usage: dict[str, int] | None,
    profile: str | None = None,
    upstream: str | None = None,
    timing: RoundTiming | None = None,
    extra_fields: dict[str, Any] | None = None,
) -> Finished | None:
    """Store the round's messages (those after its stored head; a reopened round's are all
    replaced) and mark it finished, with its timing; returns the task's new version, the round
    as the history window holds it, and whether a callback waits for it (`Round.held`). None:
    the round was no longer pending, because another process found this one's lease run out and
    settled it (the settled round stays as it is), or its task was deleted meanwhile (nothing is
    stored). On PostgreSQL a new
    (not reopened) round is finished in one statement, so the caller may run it outside a
    transaction (`Database.run_autocommit`): one round trip instead of five."""
    rows = message_rows(claim.round_id, messages)
    tokens = sum(row["tokens"] for row in rows)
    finish = {
        "round_id": claim.round_id,
        "new_status": ROUND_INTERRUPTED if interrupted else ROUND_COMPLETED,
        "new_interrupted": interrupted,
        "new_tokens": tokens,
        "new_model": without_nul(model),
        "new_finish_reason": finish_reason,
        "new_usage": usage,
        "new_finished_at": _now(),
        "new_profile": profile,
        "new_upstream": upstream,
        "new_first_token_ms": timing.first_token_ms if timing else None,
        "new_total_ms": timing.total_ms if timing else None,
        "new_error": timing.error if timing else None,
        "new_extra_fields": without_nul(extra_fields),
        "new_knowledge": timing.knowledge if timing and timing.knowledge else None,
        "new_fast_reply": without_nul(timing.fast_reply) if timing else None,
    }
    added = rows[claim.head_stored :]
    if conn.dialect.name == "postgresql" and claim.reopened_status is None:
        params = {**finish, "finish_task_id": claim.task_id, "messages": [_without_round(row) for row in added]}
        row = conn.execute(_finish_new_statement(), params).first()
        version, finished, held = row if row is not None else (None, None, False)
    else:
        version = conn.execute(_BUMP_VERSION, {"task_id": claim.task_id}).scalar_one_or_none()
        finished_row = None if version is None else conn.execute(_FINISH, finish).first()
        finished, held = finished_row if finished_row is not None else (None, False)
        if finished is not None:
            if claim.reopened_status is not None:
                conn.execute(delete(Message).where(Message.round_id == claim.round_id))
            if added:
                conn.execute(_INSERT_MESSAGES, added)
    if finished is None or version is None:
        return None
    stored = [message_from_row(r["role"], r["content"], r["name"], r["tool_call_id"], r["tool_calls"]) for r in rows]
    return Finished(version, StoredRound(claim.seq, tokens, stored), bool(held))


def message_rows(round_id: str, messages: Sequence[Msg]) -> list[dict[str, Any]]:
    """Messages as rows of the messages table, NUL characters taken out (PostgreSQL's text and
    JSON cannot hold them; SQLite would, and both must store the same)."""
    return [
        {
            "round_id": round_id,
            "position": position,
            "role": message["role"],
            "content": without_nul(message.get("content")),
            "name": without_nul(message.get("name")),
            "tool_call_id": without_nul(message.get("tool_call_id")),
            "tool_calls": without_nul(message.get("tool_calls")),
            "tokens": message_tokens(message),
        }
        for position, message in enumerate(messages)
    ]


def without_nul(value: Any) -> Any:
    """`value` (a string, or JSON made of them) without NUL characters."""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    return value


def _without_round(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "round_id"}


# Statements of every round, built once: building and cache-keying them per call cost about as
# much as running them.
_BUMP_VERSION = (
    update(Task).where(Task.id == bindparam("task_id")).values(version=Task.version + 1).returning(Task.version)
)
_BUMP_EDITS = (
    update(Task)
    .where(Task.id == bindparam("task_id"))
    .values(version=Task.version + 1, edits=Task.edits + 1)
    .returning(Task.version, Task.edits)
)
_UNBUMP_SEQ = update(Task).where(Task.id == bindparam("task_id")).values(last_seq=Task.last_seq - 1)
_INSERT_MESSAGES = insert(Message)
_MESSAGE_COLUMNS = ["position", "role", "content", "name", "tool_call_id", "tool_calls", "tokens"]
_FINISH = (
    update(Round)
    .where(Round.id == bindparam("round_id"), Round.status == ROUND_PENDING)
    .values(
        status=bindparam("new_status"),
        owner=None,
        interrupted=bindparam("new_interrupted"),
        tokens=bindparam("new_tokens"),
        model=bindparam("new_model"),
        finish_reason=bindparam("new_finish_reason"),
        profile=bindparam("new_profile", type_=Round.profile.type),
        upstream=bindparam("new_upstream", type_=Round.upstream.type),
        usage=bindparam("new_usage", type_=Round.usage.type),
        finished_at=bindparam("new_finished_at", type_=Round.finished_at.type),
        first_token_ms=bindparam("new_first_token_ms", type_=Round.first_token_ms.type),
        total_ms=bindparam("new_total_ms", type_=Round.total_ms.type),
        error=bindparam("new_error", type_=Round.error.type),
        extra_fields=bindparam("new_extra_fields", type_=Round.extra_fields.type),
        knowledge=bindparam("new_knowledge", type_=Round.knowledge.type),
        fast_reply=bindparam("new_fast_reply", type_=Round.fast_reply.type),
    )
    .returning(Round.id, Round.held)
)


def _given_messages(name: str) -> Any:
    """PostgreSQL: the message rows passed as one JSON array parameter, as a table."""
    return (
        func.json_to_recordset(bindparam(name, type_=JSON))
        .table_valued(*(column(col, Message.__table__.c[col].type) for col in _MESSAGE_COLUMNS))
        .render_derived(name=f"given_{name}", with_types=True)
    )


@cache
def _finish_new_statement() -> Any:
    """PostgreSQL: `finish_round`'s three writes as one statement (data-modifying CTEs), the
    messages passed as one JSON array and inserted only if the round was still pending. The
    version bump takes the task row's lock, as in the transaction; the statement's commit waits
    for its WAL flush."""
    # Own parameter names: in a statement with nested DML, SQLAlchemy turns every parameter
    # named like a column of an UPDATE into a SET of that column (`task_id` would move the round).
    version = (
        update(Task)
        .where(Task.id == bindparam("finish_task_id"))
        .values(version=Task.version + 1)
        .returning(Task.version)
        .cte("version")
    )
    finished = _FINISH.cte("finished")
    given = _given_messages("messages")
    messages = (
        insert(Message)
        .from_select(
            ["round_id", *_MESSAGE_COLUMNS],
            select(finished.c.id, *(given.c[name] for name in _MESSAGE_COLUMNS)).select_from(finished.join(given, true())),
        )
        .cte("messages")
    )
    return select(
        version.c.version,
        select(finished.c.id).scalar_subquery().label("finished"),
        select(finished.c.held).scalar_subquery().label("held"),
    ).add_cte(messages)


def release_round(conn: Connection, claim: Claim, failure: Failure | None = None) -> None:
    """Undo a claim whose upstream failed before answering: nothing of the round stays
    (a reopened round goes back to how it was); the failure is kept for operators."""
    if claim.reopened_status is not None:
        conn.execute(update(Round).where(Round.id == claim.round_id).values(status=claim.reopened_status))
    else:
        conn.execute(delete(Round).where(Round.id == claim.round_id))
    if failure is not None:
        # A task deleted meanwhile gets no row (the select finds no task).
        conn.execute(
            insert(FailedRequest).from_select(
                ["task_id", "request_id", "code", "message", "occurred_at"],
                select(
                    Task.id,
                    literal(failure.request_id, FailedRequest.request_id.type),
                    literal(failure.code[:64], FailedRequest.code.type),
                    literal(without_nul(failure.message), FailedRequest.message.type),
                    literal(_now(), FailedRequest.occurred_at.type),
                ).where(Task.id == claim.task_id),
            )
        )


def messages_of_rounds(conn: Connection, round_ids: list[str]) -> dict[str, list[Msg]]:
    """Each round's messages in order, by round id (every id is a key, also with no messages)."""
    by_id: dict[str, list[Msg]] = {round_id: [] for round_id in round_ids}
    for round_id, role, content, name, tool_call_id, tool_calls in conn.execute(
        select(Message.round_id, Message.role, Message.content, Message.name, Message.tool_call_id, Message.tool_calls)
        .where(Message.round_id.in_(round_ids))
        .order_by(Message.round_id, Message.position)
    ):
        by_id[round_id].append(message_from_row(role, content, name, tool_call_id, tool_calls))
    return by_id


def round_messages(conn: Connection, task_id: str) -> list[dict[str, Any]]:
    """Every finished round of a task, oldest first, with its messages (for tests and tools)."""
    rounds = conn.execute(
        select(Round.id, Round.seq, Round.status, Round.interrupted, Round.request_id)
        .where(Round.task_id == task_id, Round.status.in_(FINISHED_STATUSES))
        .order_by(Round.seq)
    ).all()
    by_id = messages_of_rounds(conn, [row.id for row in rounds])
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
