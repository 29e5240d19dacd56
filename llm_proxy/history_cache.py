"""A process-local copy of each task's recent finished rounds, so that a round's context usually
costs no query at all.

An entry is good for a new round when it covers every round before it and has the task's current
version (`tasks.version`, bumped by every change to the task's rounds, in any process); the
claim's own upsert returns both, so checking costs nothing. When other processes only added rounds
since (`tasks.edits` unchanged), the claim reads just those and the entry is extended with them:
with several workers, a task's rounds land on any of them. An entry moves forward through this
process's own finished rounds and through such extensions; an edit of a finished round (a round
taken up again) drops it, and the next claim reads the whole window and fills it again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llm_proxy.context import StoredRound
from llm_proxy.store import HistoryCopy


@dataclass
class _Entry:
    copy: HistoryCopy
    # Newest first, at most `max_rounds`.
    rounds: list[StoredRound]


class HistoryCache:
    def __init__(self, max_tasks: int, max_rounds: int) -> None:
        self._max_tasks = max_tasks
        self._max_rounds = max_rounds
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def known(self, task_id: str) -> HistoryCopy | None:
        """What the task's entry holds, for the claim to check."""
        entry = self._entries.get(task_id)
        return None if entry is None else entry.copy

    def get(self, task_id: str, version: int, before_seq: int) -> list[StoredRound] | None:
        """The finished rounds before `before_seq`, newest first, if the entry is current."""
        entry = self._entries.get(task_id)
        if entry is None or entry.copy.version != version or entry.copy.through_seq != before_seq - 1:
            return None
        self._entries.move_to_end(task_id)
        return entry.rounds

    def put(self, task_id: str, copy: HistoryCopy, rounds: list[StoredRound]) -> None:
        if self._max_tasks <= 0:
            return
        self._entries[task_id] = _Entry(copy, rounds[: self._max_rounds])
        self._entries.move_to_end(task_id)
        while len(self._entries) > self._max_tasks:
            self._entries.popitem(last=False)

    def extend(self, task_id: str, after_seq: int, newer: list[StoredRound], copy: HistoryCopy) -> list[StoredRound] | None:
        """The entry brought up to `copy` with the rounds added after `after_seq` (newest first),
        if it still is the copy those were read against; its rounds, newest first."""
        entry = self._entries.get(task_id)
        if entry is None or entry.copy.through_seq != after_seq or entry.copy.edits != copy.edits:
            return None
        rounds = [*newer, *entry.rounds][: self._max_rounds]
        self.put(task_id, copy, rounds)
        return rounds

    def drop(self, task_id: str) -> None:
        self._entries.pop(task_id, None)

    def advance(self, task_id: str, version: int, stored: StoredRound) -> None:
        """This process just added `stored` to the task, making its version `version`. When others
        changed the task in between, the entry stays as it was: still right for the rounds it
        holds, and the next claim reads what came after them."""
        entry = self._entries.get(task_id)
        if entry is None:
            return
        copy = entry.copy
        if copy.version == version - 1 and copy.through_seq == stored.seq - 1:
            entry.copy = HistoryCopy(version, stored.seq, copy.edits)
            entry.rounds = [stored, *entry.rounds[: self._max_rounds - 1]]
