"""Callback events as received: each stored once (by its digest), with the round it concerns
when the orchestrator's RoundId could be matched to one of ours."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base
from llm_proxy.models import ID_MAX_CHARS, BigId


class CallbackEvent(Base):
    __tablename__ = "callback_events"
    __table_args__ = (
        Index("ix_callback_events_task_type", "task_id", "event_type"),
        Index(
            "ix_callback_events_held",
            "task_id",
            postgresql_where=text("held_since IS NOT NULL"),
            sqlite_where=text("held_since IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # sha256 of the event's type and EventInfo: the orchestrator resends for a minute.
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    event_type: Mapped[int] = mapped_column(Integer)
    # Not a foreign key: events arrive for tasks the proxy has not seen (yet), and stay when a
    # task's rounds are deleted.
    task_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    trtc_round_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    # Our round (rounds.id) the event concerns, when it could be matched.
    round_id: Mapped[str | None] = mapped_column(String(32))
    event_ms_ts: Mapped[int | None] = mapped_column(BigInteger)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Since when a 903/905 waits for its task's open round to be stored (null: not waiting).
    held_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Retention purges events of tasks it never saw by this.
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
