"""Memory's tables: a task's rolling summary (the rounds up to `through_seq`, folded by the memory
upstream from their stored text: what was heard, after 905 cuts), and an end user's memory across
tasks, keyed on `(X-Sdk-App-Id, profile, user id)`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base
from llm_proxy.models import ID_MAX_CHARS


class Summary(Base):
    __tablename__ = "summaries"
    # A user's deletion finds the tasks their memory came from here (the memory's user id may be
    # a MetaInfo field, not the task's X-User-Id).
    __table_args__ = (Index("ix_summaries_user", "user_app", "user_id"),)

    task_id: Mapped[str] = mapped_column(String(ID_MAX_CHARS), ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    # The last round (seq) the text covers; 0: none yet.
    through_seq: Mapped[int] = mapped_column(Integer, default=0)
    text: Mapped[str] = mapped_column(Text, default="")
    # A round it covers changed (a 905 cut it): the summary is redone from the first round.
    stale: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # The process folding rounds into it now (`Instance.id`), until when: one writer per task.
    writer: Mapped[str | None] = mapped_column(String(32))
    writer_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Per-user memory (`memory.per_user`): whose task this is, as its first round said; what the
    # user's memory held when the task started (every round of the task carries this copy); the
    # rounds already folded into the user's memory; the model that folds them.
    user_app: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    user_profile: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))
    user_memory: Mapped[str | None] = mapped_column(Text)
    user_folded_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    model: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS))


class UserMemory(Base):
    """What was learnt about an end user in their finished tasks, for their next ones."""

    __tablename__ = "user_memories"
    # Retention deletes memories by age, oldest first.
    __table_args__ = (Index("ix_user_memories_updated_at", "updated_at"),)

    sdk_app_id: Mapped[str] = mapped_column(String(ID_MAX_CHARS), primary_key=True)
    profile: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(ID_MAX_CHARS), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    # Bumped by every write: two tasks of a user folded at once by two processes never lose one.
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
