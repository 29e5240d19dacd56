"""What each callback event changes. Every event is stored once (resends are recognised by their
digest and answered without doing anything again); then, by type:

- 903 (a full ASR sentence or LLM reply) and 905 (what the bot said) tell which of our rounds has
  the orchestrator's RoundId: matched by text among the task's recent rounds;
- 905 also cuts the stored reply to what was said (`heard`), marking the round interrupted, so
  that every later context holds only what the user heard;
- 906 and 908 are tied to the round with their RoundId, and go to `/metrics`; a 906
  `interruption` marks its round interrupted (the stored text stays: only a 905 says what was
  heard);
- 902 ends the task (`Task.ended_at`, `leave_code`); this process's history copy of it goes.

A 903 or 905 that matches no stored round while a round of its task is still open (streaming,
or pending after a crash) is held: the round is marked (`Round.held`), and the process that
stores it applies the event at once (`apply_held`), cutting the reply as stored. If no such
round is ever stored, the event's wait ends after `CALLBACK_HOLD_S` and it stays unmatched.

The SQL runs in one transaction per event (`record`), which takes the task row first when it
may write rounds, as every writer of rounds does; `CallbackService` runs it and updates the
metrics and this process's history copy.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from core.db import Database
from core.metrics import ORCHESTRATOR_COUNTS, ORCHESTRATOR_ERRORS, ORCHESTRATOR_EVENTS, ORCHESTRATOR_LATENCIES
from llm_proxy.context import Msg, message_tokens
from llm_proxy.history_cache import HistoryCache
from llm_proxy.models import FINISHED_STATUSES, ROUND_INTERRUPTED, ROUND_PENDING, Message, Round, Task
from llm_proxy.store import bump_edits, message_from_row
from memory.store import mark_stale
from orchestrator import heard as heard_rules
from orchestrator.models import CallbackEvent as StoredEvent
from orchestrator.protocol import ERROR_METRIC, HEARD, INT32, METRIC, TASK_STOPPED, TRANSCRIPT, CallbackEvent

log = logging.getLogger("trtc.callbacks")

# How far back a 903/905 text is looked for among a task's rounds.
_RECENT_ROUNDS = 10
# The 906 metric that says the user interrupted the bot in a round.
INTERRUPTION = "interruption"


@dataclass(frozen=True)
class Recorded:
    new: bool  # False: a resend of an event already stored
    round_id: str | None = None  # our round it concerns, if matched
    cut: bool = False  # a 905 cut the round's stored reply
    held: bool = False  # it waits for the task's open round to be stored (`apply_held`)


@dataclass
class _Candidate:
    id: str
    trtc_round_id: str | None
    unheard: str | None
    messages: list[tuple[int, Msg]]  # (position, message)


def record(conn: Connection, event: CallbackEvent, body: dict[str, Any], digest: str) -> Recorded:
    task_id = event.info.task_id
    inserted = conn.execute(
        _insert_statement(conn.dialect.name),
        {
            "digest": digest,
            "event_type": event.event_type,
            "task_id": task_id,
            "trtc_round_id": event.round_id,
            "event_ms_ts": event.info.event_ms_ts,
            "body": body,
            "received_at": datetime.now(timezone.utc),
        },
    ).first()
    if inserted is None:
        return Recorded(new=False)
    if task_id is None:
        return Recorded(new=True)
    if _awaits_round(event):
        _lock_task(conn, task_id)
    round_id, cut = _match(conn, event, task_id)
    if round_id is None and _awaits_round(event):
        if _hold(conn, task_id):
            conn.execute(update(StoredEvent).where(StoredEvent.id == inserted.id).values(held_since=datetime.now(timezone.utc)))
            return Recorded(new=True, held=True)
        # No round is open any more: the one that was may have been stored since the first look.
        round_id, cut = _match(conn, event, task_id)
    if round_id is not None:
        conn.execute(update(StoredEvent).where(StoredEvent.id == inserted.id).values(round_id=round_id))
        if _is_interruption(event):
            conn.execute(update(Round).where(Round.id == round_id).values(interrupted=True))
    elif _awaits_round(event):
        _log_unmatched(event, task_id)
    if event.event_type == TASK_STOPPED:
        _end_task(conn, event, task_id)
    return Recorded(new=True, round_id=round_id, cut=cut)


def _end_task(conn: Connection, event: CallbackEvent, task_id: str) -> None:
    """902: the task is over, at the event's time, for its `LeaveCode` (an integer, or none)."""
    code = event.info.payload.get("LeaveCode")
    ms = event.info.event_ms_ts
    try:
        ended = datetime.fromtimestamp(ms / 1000, timezone.utc) if ms is not None else datetime.now(timezone.utc)
    except (OverflowError, OSError, ValueError):  # a time no datetime holds: when it came, then
        ended = datetime.now(timezone.utc)
    conn.execute(
        update(Task)
        .where(Task.id == task_id)
        .values(ended_at=ended, leave_code=code if isinstance(code, int) and -INT32 <= code <= INT32 else None)
    )


def _awaits_round(event: CallbackEvent) -> bool:
    """903 and 905 are matched by text, which the round has only once it is stored."""
    return event.event_type == HEARD or (event.event_type == TRANSCRIPT and event.round_id is not None)


def _match(conn: Connection, event: CallbackEvent, task_id: str) -> tuple[str | None, bool]:
    """Our round the event concerns, and whether a 905 cut its stored reply."""
    text = str(event.info.payload.get("Text") or "")
    if event.event_type == HEARD:
        return _apply_heard(conn, task_id, event.round_id, text)
    if event.event_type == TRANSCRIPT and event.round_id:
        return _match_transcript(conn, task_id, event.round_id, text), False
    if event.round_id:
        round_id = conn.execute(
            select(Round.id).where(Round.task_id == task_id, Round.trtc_round_id == event.round_id).limit(1)
        ).scalar()
        return round_id, False
    return None, False


def _lock_task(conn: Connection, task_id: str) -> None:
    """The task row first, as every writer of rounds takes it (`finish_round` too): a cut, a
    hold and a round's finish then never wait for each other in a circle. (SQLite has one
    writer at a time: there the transaction itself is the lock.)"""
    conn.execute(select(Task.id).where(Task.id == task_id).with_for_update())


def _hold(conn: Connection, task_id: str) -> bool:
    """Mark the task's open rounds as awaited; False if none is open. The mark is on the pending
    row itself: a concurrent `finish_round` either stores the round first (this then finds none
    open) or waits for this write and returns the mark (on PostgreSQL, an UPDATE that waited for
    a row re-reads it)."""
    marked = conn.execute(
        update(Round).where(Round.task_id == task_id, Round.status == ROUND_PENDING).values(held=True).returning(Round.id)
    ).first()
    return marked is not None


def _log_unmatched(event: CallbackEvent, task_id: str) -> None:
    log.warning("%d matches no recent round of the task; stored only", event.event_type,
                extra={"task_id": task_id, "trtc_round_id": event.round_id})


def apply_held(conn: Connection, task_id: str, *, final: bool) -> bool:
    """Match the task's held events now that a round it had open is stored; returns whether one
    cut a stored reply. An event that still matches nothing waits on while another round of the
    task is open, unless `final` (its wait is over): then it stays stored, unmatched."""
    cut_any = False
    _lock_task(conn, task_id)
    held = conn.execute(
        select(StoredEvent.id, StoredEvent.body)
        .where(StoredEvent.task_id == task_id, StoredEvent.held_since.is_not(None))
        .order_by(StoredEvent.id)
    ).all()
    for event_id, body in held:
        event = CallbackEvent.model_validate(body)
        round_id, cut = _match(conn, event, task_id)
        if round_id is None and not final and _hold(conn, task_id):
            continue
        conn.execute(update(StoredEvent).where(StoredEvent.id == event_id).values(held_since=None, round_id=round_id))
        if round_id is None:
            _log_unmatched(event, task_id)
        cut_any = cut_any or cut
    return cut_any


def _insert_statement(dialect: str) -> Any:
    insert = (postgresql if dialect == "postgresql" else sqlite).insert(StoredEvent)
    return insert.on_conflict_do_nothing(index_elements=[StoredEvent.digest]).returning(StoredEvent.id)


def _candidates(conn: Connection, task_id: str, trtc_round_id: str | None) -> list[_Candidate]:
    """The round already known by this RoundId, or else the task's recent finished rounds,
    newest first, with their messages."""
    query = select(Round.id, Round.trtc_round_id, Round.unheard).where(
        Round.task_id == task_id, Round.status.in_(FINISHED_STATUSES)
    )
    rows: Sequence[Any] = []
    if trtc_round_id is not None:
        rows = conn.execute(query.where(Round.trtc_round_id == trtc_round_id)).all()
    if not rows:
        rows = conn.execute(query.order_by(Round.seq.desc()).limit(_RECENT_ROUNDS)).all()
    candidates = {row.id: _Candidate(row.id, row.trtc_round_id, row.unheard, []) for row in rows}
    if not candidates:
        return []
    for round_id, position, role, content, name, tool_call_id, tool_calls in conn.execute(
        select(Message.round_id, Message.position, Message.role, Message.content, Message.name,
               Message.tool_call_id, Message.tool_calls)
        .where(Message.round_id.in_(list(candidates)))
        .order_by(Message.round_id, Message.position)
    ):
        message = message_from_row(role, content, name, tool_call_id, tool_calls)
        candidates[round_id].messages.append((position, message))
    return [candidates[row.id] for row in rows]


def _apply_heard(conn: Connection, task_id: str, trtc_round_id: str | None, text: str) -> tuple[str | None, bool]:
    for candidate in _candidates(conn, task_id, trtc_round_id):
        messages = [message for _position, message in candidate.messages]
        reply = heard_rules.reply_text(messages)
        heard = heard_rules.heard_length(reply, text)
        known = trtc_round_id is not None and candidate.trtc_round_id == trtc_round_id
        if heard is None and known and not heard_rules.normalized(text)[0]:
            heard = 0  # the round is known and the bot said nothing of it
        if heard is None:
            continue
        _tag(conn, candidate, trtc_round_id)
        if heard >= len(reply):
            return candidate.id, False
        _cut(conn, task_id, candidate, heard)
        return candidate.id, True
    return None, False


def _cut(conn: Connection, task_id: str, candidate: _Candidate, heard: int) -> None:
    """Cut the round's stored reply after `heard` characters. The task row goes first (the
    version and edit bump tell every process's history copy that a finished round changed)."""
    bump_edits(conn, task_id)
    cut = heard_rules.cut_reply([message for _position, message in candidate.messages], heard)
    changed = [
        {"b_round_id": candidate.id, "b_position": position, "b_content": new["content"], "b_tokens": message_tokens(new)}
        for (position, old), new in zip(candidate.messages, cut.messages)
        if new.get("content") != old.get("content")
    ]
    if changed:
        conn.execute(_UPDATE_MESSAGE, changed)
    mark_stale(conn, task_id, candidate.id)
    conn.execute(
        update(Round)
        .where(Round.id == candidate.id)
        .values(
            status=ROUND_INTERRUPTED,
            interrupted=True,
            unheard=cut.unheard + (candidate.unheard or ""),
            tokens=sum(message_tokens(m) for m in cut.messages),
        )
    )


_UPDATE_MESSAGE = (
    update(Message)
    .where(Message.round_id == bindparam("b_round_id"), Message.position == bindparam("b_position"))
    .values(content=bindparam("b_content"), tokens=bindparam("b_tokens"))
)


def _tag(conn: Connection, candidate: _Candidate, trtc_round_id: str | None) -> None:
    """Our round is the orchestrator's `trtc_round_id`: events that came for that RoundId before
    (a 906 `interruption` may precede the 903 or 905 that names the round) now apply to it."""
    if trtc_round_id is None or candidate.trtc_round_id == trtc_round_id:
        return
    earlier = conn.execute(
        select(StoredEvent.body).where(
            StoredEvent.task_id == select(Round.task_id).where(Round.id == candidate.id).scalar_subquery(),
            StoredEvent.trtc_round_id == trtc_round_id,
            StoredEvent.event_type == METRIC,
            StoredEvent.round_id.is_(None),
        )
    ).scalars()
    interrupted = any(_is_interruption(CallbackEvent.model_validate(body)) for body in earlier)
    values: dict[str, Any] = {"trtc_round_id": trtc_round_id}
    if interrupted:
        values["interrupted"] = True
    conn.execute(update(Round).where(Round.id == candidate.id).values(**values))


def _is_interruption(event: CallbackEvent) -> bool:
    return event.event_type == METRIC and event.info.payload.get("Metric") == INTERRUPTION


def _match_transcript(conn: Connection, task_id: str, trtc_round_id: str, text: str) -> str | None:
    """The round whose whole reply, or whose user turn, is this 903's text."""
    wanted, _ = heard_rules.normalized(text)
    if not wanted:
        return None
    for candidate in _candidates(conn, task_id, trtc_round_id):
        messages = [message for _position, message in candidate.messages]
        said = heard_rules.normalized(heard_rules.reply_text(messages))[0]
        asked = heard_rules.normalized("".join(m.get("content") or "" for m in messages if m["role"] == "user"))[0]
        if wanted in (said, asked):
            _tag(conn, candidate, trtc_round_id)
            return candidate.id
    return None


class CallbackService:
    def __init__(self, db: Database, history: HistoryCache | None, hold_s: float = 90.0) -> None:
        self._db = db
        self._history = history
        self._hold_s = hold_s
        self._timers: set[asyncio.Task[None]] = set()
        # What to do when the orchestrator stops a task (902): the app wires in memory's
        # `task_ended` (its rounds go into its user's memory).
        self.on_task_ended: Callable[[str], None] | None = None

    async def receive(self, event: CallbackEvent, body: dict[str, Any]) -> Recorded:
        recorded = await self._db.run(record, event, body, event.digest(body))
        if not recorded.new:
            return recorded
        ORCHESTRATOR_EVENTS.labels(str(event.event_type)).inc()
        task_id = event.info.task_id
        if (recorded.cut or event.event_type == TASK_STOPPED) and task_id:
            self._drop_history(task_id)
        if event.event_type == TASK_STOPPED and task_id and self.on_task_ended is not None:
            self.on_task_ended(task_id)
        if recorded.held and task_id:
            # The round's own process applies it when it stores the round; this is for a round
            # that is never stored (its process died and it was settled, or it was released).
            timer = asyncio.create_task(self._give_up_waiting(task_id))
            self._timers.add(timer)
            timer.add_done_callback(self._timers.discard)
        if event.event_type == METRIC:
            _observe(event.info.payload)
        elif event.event_type == ERROR_METRIC:
            payload = event.info.payload
            ORCHESTRATOR_ERRORS.labels(_label(payload.get("Metric", "")), _label(event.tag.get("Code", ""))).inc()
        return recorded

    async def apply_held(self, task_id: str, *, final: bool = False) -> None:
        """`apply_held` for a task whose awaited round was just stored (or whose wait is over)."""
        if await self._db.run(apply_held, task_id, final=final):
            self._drop_history(task_id)

    async def _give_up_waiting(self, task_id: str) -> None:
        await asyncio.sleep(self._hold_s)
        try:
            await self.apply_held(task_id, final=True)
        except Exception as exc:  # the database is down: the event stays held, and is kept
            log.warning("held callbacks of the task could not be settled: %s", exc, extra={"task_id": task_id})

    async def stop(self) -> None:
        for timer in list(self._timers):
            timer.cancel()

    def _drop_history(self, task_id: str) -> None:
        if self._history is not None:
            self._history.drop(task_id)


def _label(value: Any) -> str:
    """A metric label from the orchestrator, cut short: labels are kept for the process's life."""
    return str(value)[:64]


def _observe(payload: dict[str, Any]) -> None:
    name = str(payload.get("Metric", ""))
    try:
        value = float(payload.get("Value", 0))
    except (TypeError, ValueError):
        return
    if name in ORCHESTRATOR_LATENCIES:
        ORCHESTRATOR_LATENCIES[name].observe(value / 1000)
    elif name in ORCHESTRATOR_COUNTS:
        ORCHESTRATOR_COUNTS[name].inc()
