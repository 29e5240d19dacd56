"""A task's rolling summary: the rounds up to `through_seq`, folded by the memory upstream from
their stored text (what was heard, after 905 cuts)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base
from llm_proxy.models import ID_MAX_CHARS


class Summary(Base):
    __tablename__ = "summaries"

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
