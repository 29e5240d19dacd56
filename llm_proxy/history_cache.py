"""A process-local copy of each task's recent finished rounds, so that a round's context usually
costs no query at all.

An entry is good for a new round when it covers every round before it and has the task's current
version (`tasks.version`, bumped by every change to the task's rounds, in any process); the
claim's own upsert returns both, so checking costs nothing. An entry only moves forward through
this process's own finished rounds, and only when nothing else changed the task in between;
anything else drops it, and the next claim reads the window from the database and fills it again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llm_proxy.context import StoredRound


@dataclass
class _Entry:
    version: int
    through_seq: int
    # Newest first, at most `max_rounds`.
    rounds: list[StoredRound]


class HistoryCache:
    def __init__(self, max_tasks: int, max_rounds: int) -> None:
        self._max_tasks = max_tasks
        self._max_rounds = max_rounds
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def known(self, task_id: str) -> tuple[int, int] | None:
        """(version, last covered seq) of the task's entry, for the claim to check."""
        entry = self._entries.get(task_id)
        return None if entry is None else (entry.version, entry.through_seq)

    def get(self, task_id: str, version: int, before_seq: int) -> list[StoredRound] | None:
        """The finished rounds before `before_seq`, newest first, if the entry is current."""
        entry = self._entries.get(task_id)
        if entry is None or entry.version != version or entry.through_seq != before_seq - 1:
            return None
        self._entries.move_to_end(task_id)
        return entry.rounds

    def put(self, task_id: str, version: int, before_seq: int, rounds: list[StoredRound]) -> None:
        if self._max_tasks <= 0:
            return
        self._entries[task_id] = _Entry(version, before_seq - 1, rounds[: self._max_rounds])
        self._entries.move_to_end(task_id)
        while len(self._entries) > self._max_tasks:
            self._entries.popitem(last=False)

    def drop(self, task_id: str) -> None:
        self._entries.pop(task_id, None)

    def advance(self, task_id: str, version: int, stored: StoredRound) -> None:
        """This process just stored `stored`, making the task's version `version`."""
        entry = self._entries.get(task_id)
        if entry is None:
            return
        if entry.version == version - 1 and entry.through_seq == stored.seq - 1:
            entry.version, entry.through_seq = version, stored.seq
            entry.rounds = [stored, *entry.rounds[: self._max_rounds - 1]]
        else:
            self.drop(task_id)
