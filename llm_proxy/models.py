"""Conversation storage: a task holds ordered rounds; a round holds its messages.

A round is one user turn and the assistant's reply (later also the tool calls and results in
between). Rounds are immutable once finished, except the reply text of an interrupted round, which
the orchestrator's callbacks may later cut to what the user actually heard.

A pending round names the server process working on it (`owner`, an `Instance`); a process renews
its lease while it runs, so a round whose owner's lease ran out belongs to a dead process and is
settled by whichever process meets it first (`llm_proxy/recovery.py`).

Identifiers the orchestrator sends (task, request, app, user, room) are at most `ID_MAX_CHARS`
characters; longer ones are refused before anything is stored (`serving.task_info`, and the
`model` field in `protocol`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base

ROUND_PENDING = "pending"
ROUND_COMPLETED = "completed"
ROUND_INTERRUPTED = "interrupted"
FINISHED_STATUSES = (ROUND_COMPLETED, ROUND_INTERRUPTED)
ID_MAX_CHARS = 256
# The app of requests without X-Sdk-App-Id in the admin API's user routes; refused as a header value,
# so that the two cannot be confused there.
NO_APP = "-"


def storable_id(value: str) -> bool:
    """Whether an identifier fits its column on both databases: at most `ID_MAX_CHARS`, no NUL
    (PostgreSQL refuses NUL in text, also in a query's parameter)."""
    return len(value) <= ID_MAX_CHARS and "\x00" not in value

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit id.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        # The admin list (newest activity first) and retention (oldest first) read this.
        Index("ix_tasks_updated_at", "updated_at", "id"),
        Index("ix_tasks_user", "sdk_app_id", "user_id"),
    )

    id: Mapped[str] = mapped_column(String(ID_MAX_CHARS), primary_key=True)
    # Who owns the task: the agent profile and the X-Sdk-App-Id of the request that created it.
    # A request of another profile or app for the same id is refused (`store.TaskOwnedElsewhere`).
    # Null only for a task stored before owners were kept; its next round adopts it.
    profile: Mapped[str | None] = mapped_column(String(64))
    sdk_app_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    # The end user, as first given: a later request naming another never moves the task.
    user_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    room_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    room_id_type: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    # Last round sequence number handed out; incremented under the row lock.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped by every change to the task's stored rounds, so a process that keeps a copy of the
    # history window knows when another process (or an edit) made it stale.
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Bumped only when a finished round is changed (taken up again, cut short): while it stays the
    # same, a copy of the history stays right for the rounds it holds, and only newer rounds need
    # reading. It starts at a random number, so a task deleted and then created again (same id)
    # never matches a copy some process still holds of the old one.
    edits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The orchestrator said the task stopped (event 902), when and why (its `LeaveCode`); a later
    # round of the task opens it again.
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    leave_code: Mapped[int | None] = mapped_column(Integer)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("task_id", "seq", name="uq_rounds_task_seq"),
        UniqueConstraint("task_id", "request_id", name="uq_rounds_task_request"),
        # Only pending rounds: the start-up and periodic sweeps for dead ones read this.
        Index(
            "ix_rounds_pending",
            "owner",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    # The orchestrator's RoundId, once a callback tells it (event 903/905).
    trtc_round_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS), index=True)
    # The end of the reply the user never heard (event 905 cut it off the stored messages): the
    # reply as the model wrote it is the messages' text followed by this.
    unheard: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=ROUND_PENDING)
    # The process answering a pending round (`Instance.id`).
    owner: Mapped[str | None] = mapped_column(String(32))
    # A 903/905 came while the round was open and waits for it (`orchestrator.callbacks`): set
    # on the pending row, so that the statement storing the round returns it, race or not.
    held: Mapped[bool] = mapped_column(Boolean, server_default=false())
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    model: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    # Which agent profile answered, and which of its upstreams (`base_url#model`).
    profile: Mapped[str | None] = mapped_column(String(64))
    upstream: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    # Estimated tokens of all the round's messages: the history window sums these.
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The proxy's time from the request to the first token, and to the stored reply (written
    # by the finish statement itself; null for rounds settled by recovery).
    first_token_ms: Mapped[int | None] = mapped_column(Integer)
    total_ms: Mapped[int | None] = mapped_column(Integer)
    # The request's body fields that are no OpenAI parameter (the orchestrator's MetaInfo):
    # kept here, sent upstream only where the profile says so.
    extra_fields: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The upstream's error code when it failed mid-reply (the round is stored interrupted).
    error: Mapped[str | None] = mapped_column(String(64))
    # The knowledge passages the round gave the model (`knowledge/`): base, document, chunk, score.
    knowledge: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # The fast reply's line the reply began with (`fast_reply`; it is in the messages too).
    fast_reply: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_round_position", "round_id", "position", unique=True),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str | None] = mapped_column(Text)
    # Whatever the client or the model named them: no length of theirs fails a round.
    name: Mapped[str | None] = mapped_column(Text)
    tool_call_id: Mapped[str | None] = mapped_column(Text)
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    tokens: Mapped[int] = mapped_column(Integer, default=0)


class FailedRequest(Base):
    """A request of a task that failed before its round had an answer (the upstream refused,
    timed out, ...): the round itself is not kept, so the retry starts clean; this row is what
    operators see of it."""

    __tablename__ = "failed_requests"
    __table_args__ = (Index("ix_failed_requests_task", "task_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    request_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Instance(Base):
    """A server process that claims rounds, and its lease: renewed every `LEASE_RENEW_S` while it
    runs, so `lease_expires` in the past means the process is gone (or stalled past its lease)."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Where it runs, so a process on the same machine can tell at once that it is gone
    # (`recovery.local_process_gone`): boot id, pid namespace, pid and start time.
    process: Mapped[str | None] = mapped_column(String(200))
    # Seconds since the epoch by the database's clock (all replicas read the same clock).
    lease_expires: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The once-per-deployment chores it is configured for ("retention"); the oldest live process
    # with a chore does it (`recovery.oldest_live_instance`).
    chores: Mapped[str | None] = mapped_column(String(64))
