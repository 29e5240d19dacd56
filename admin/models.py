"""What the admin side stores: notices of deleted tasks, which every process reads to drop its
in-memory copy of their history (`admin/lifecycle.py`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base
from llm_proxy.models import ID_MAX_CHARS, BigId


class Deletion(Base):
    """A task deleted (by the admin API or by retention). Kept only as long as a process may
    take to read it (`lifecycle.NOTICE_KEEP_S`); correctness does not depend on it (a task made
    again under the same id never matches an old copy, see `tasks.edits`), only how soon the
    deleted words leave every process's memory."""

    __tablename__ = "deletions"
    # Ids only ever grow, even on SQLite once old notices are deleted (readers follow them by id).
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(ID_MAX_CHARS))
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
