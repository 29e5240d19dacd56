"""This process's part of memory: what a round carries (read once per task and kept, as the history
copy is), and the folds, which run in the background, one job per task.

A live round never waits for the memory upstream: it reads what was written so far and asks for
the fold. A slow or failing fold (an error, no text, no answer within `MEMORY_FOLD_TIMEOUT_S`)
only delays the text and never changes it (logged with the task, counted on /metrics as
`trtc_memory_summaries_total{outcome="failed"}`); the task's next round, or a later sweep, asks
again. A task's rounds are folded into its user's memory when the orchestrator says the task
ended (902) or when it has been idle for `MEMORY_USER_IDLE_S`; every process sweeps for such tasks,
so a crashed writer's work is picked up by another. A sweep that finds a full batch takes the next
one as soon as its folds are done: the backlog drains at `FOLDS_AT_ONCE` folds at a time.

Each job runs in a context of its own (not the one of the request that asked for it), so its log
lines name its task and fold, never an unrelated request."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import OrderedDict
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Callable

from core.db import Database
from core.logs import task_id_var
from core.metrics import MEMORY_SUMMARIES
from llm_proxy.agents import Agent, Agents, UpstreamClients
from llm_proxy.memory_context import MemoryView, UserKey
from memory import store
from memory.summarizer import SUMMARY_INSTRUCTIONS, USER_INSTRUCTIONS, Writer, fold

log = logging.getLogger("trtc.memory")

# Rounds folded per call of the memory upstream.
BATCH_ROUNDS = 20
# Tasks a sweep takes up at a time (the next batch follows as soon as these are folded).
SWEEP_TASKS = 32
# Folds this process runs at once: however many tasks want one, the memory upstream (and the
# cores the live rounds share) get at most this many background calls.
FOLDS_AT_ONCE = 4
# Folds of one batch into a user's memory that other tasks of the user may overtake before this
# one gives up (and the next sweep tries again).
MOVED_RETRIES = 3


class Keeper:
    def __init__(
        self, db: Database, clients: UpstreamClients, agents: Callable[[], Agents], instance_id: str,
        cache_tasks: int, user_idle_s: float, fold_timeout_s: float,
    ) -> None:
        self._db = db
        self._clients = clients
        # The profiles as they are now (replaced on SIGHUP): a sweep folds with its task's profile.
        self._agents = agents
        self._me = instance_id
        # What each task's rounds carry, as of the task's `edits` (a 905 or a deletion changes them).
        self._views: OrderedDict[str, tuple[int, MemoryView]] = OrderedDict()
        self._cache_tasks = cache_tasks
        self._user_idle_s = user_idle_s
        self._fold_timeout_s = fold_timeout_s
        # Tasks whose rounds went into their user's memory (or needed none): a sweep's progress.
        self._user_folds_done = 0
        # Per task: the newest round its summary should cover (and with whom), whether its rounds
        # are due in its user's memory, and the job doing either.
        self._wanted: dict[str, tuple[int, Writer]] = {}
        self._user_due: set[str] = set()
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._running = asyncio.Semaphore(FOLDS_AT_ONCE)
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-sweep")

    async def stop(self) -> None:
        tasks = [*self._jobs.values(), *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def view(self, task_id: str, edits: int, user: UserKey | None, model: str) -> MemoryView:
        cached = self._views.get(task_id)
        if cached is not None and cached[0] == edits:
            self._views.move_to_end(task_id)
            return cached[1]
        view = await self._db.run(store.view, task_id, user, model)
        self._keep(task_id, edits, view)
        return view

    def forget(self, task_id: str) -> None:
        """The task was deleted (here or in another process): its copy goes."""
        self._views.pop(task_id, None)

    def fold_up_to(self, task_id: str, up_to_seq: int, agent: Agent, model: str) -> None:
        """Ask for the task's rounds up to `up_to_seq` in its summary; returns at once."""
        wanted = self._wanted.get(task_id)
        if wanted is None or wanted[0] < up_to_seq:
            self._wanted[task_id] = (up_to_seq, Writer.of(agent, self._clients, model))
        self._start(task_id)

    def task_ended(self, task_id: str) -> None:
        """The orchestrator stopped the task (902): its rounds go into its user's memory now."""
        self._user_due.add(task_id)
        self._start(task_id)

    def _start(self, task_id: str) -> None:
        if task_id not in self._jobs:  # else the running job goes on to what is wanted now
            self._jobs[task_id] = asyncio.create_task(self._run(task_id), context=contextvars.Context())

    def _keep(self, task_id: str, edits: int, view: MemoryView) -> None:
        self._views[task_id] = (edits, view)
        self._views.move_to_end(task_id)
        while len(self._views) > self._cache_tasks:
            self._views.popitem(last=False)

    def _update(self, task_id: str, through_seq: int, text: str) -> None:
        """This process wrote the task's summary: the rounds it serves carry the new one."""
        cached = self._views.get(task_id)
        if cached is not None:
            edits, view = cached
            self._views[task_id] = (edits, replace(view, through_seq=through_seq, summary=text or None, stale=False))

    async def _run(self, task_id: str) -> None:
        try:
            async with self._running:
                await self._work_on(task_id)
        finally:
            del self._jobs[task_id]
        if task_id in self._wanted or task_id in self._user_due:
            self._start(task_id)  # asked for while the job was past that point

    async def _work_on(self, task_id: str) -> None:
        task_id_var.set(task_id)
        try:
            done = 0
            while (wanted := self._wanted.get(task_id)) is not None and wanted[0] > done:
                done = wanted[0]
                await self._fold_summary(task_id, done, wanted[1])
                if self._wanted.get(task_id) == wanted:
                    del self._wanted[task_id]
        except Exception as exc:  # the memory upstream or the database: asked again later
            self._wanted.pop(task_id, None)
            _failed("summary", exc)
        if task_id in self._user_due:
            self._user_due.discard(task_id)
            try:
                await self._fold_user(task_id)
            except Exception as exc:
                _failed("user", exc)

    async def _fold_summary(self, task_id: str, up_to_seq: int, writer: Writer) -> None:
        """Batch by batch; the usual fold (one batch) is two transactions: take the hold and read
        the rounds, then write the summary and let go."""
        taken = await self._db.run_in_background(store.take_batch, task_id, self._me, up_to_seq, BATCH_ROUNDS)
        if taken is None:
            return  # another process writes it now
        through, text, rounds = taken
        self._update(task_id, through, text)
        held = True
        try:
            while rounds:
                messages = [m for _seq, messages in rounds for m in messages]
                text = await fold(writer, SUMMARY_INSTRUCTIONS, text, messages, deadline_s=self._fold_timeout_s)
                last = rounds[-1][0] >= up_to_seq or len(rounds) < BATCH_ROUNDS
                if await self._db.run_in_background(store.write, task_id, self._me, rounds[-1][0], text, release=last):
                    through, held = rounds[-1][0], not last
                    self._update(task_id, through, text)
                    MEMORY_SUMMARIES.labels("written").inc()
                    if last:
                        return
                    rounds = await self._db.run_in_background(store.rounds_after, task_id, through, up_to_seq, BATCH_ROUNDS)
                    continue
                # A 905 changed a covered round: start again from what the summary now says.
                taken = await self._db.run_in_background(store.take_batch, task_id, self._me, up_to_seq, BATCH_ROUNDS)
                if taken is None:
                    held = False
                    return
                through, text, rounds = taken
        finally:
            if held:
                await self._db.run_in_background(store.release, task_id, self._me)

    async def _fold_user(self, task_id: str) -> None:
        """The task's rounds not in its user's memory yet, folded into it batch by batch; a
        memory another task of the user changed meanwhile is read again and the batch redone."""
        taken = await self._db.run_in_background(store.take_for_user, task_id, self._me)
        if taken is None:
            return
        # A failure keeps the hold until it runs out (HOLD_S): a failing memory upstream is tried
        # again then, not at every sweep.
        agent = self._agents().get(taken.user.profile)
        if agent is not None and agent.profile.memory.per_user:
            writer = Writer.of(agent, self._clients, agent.model(None) or taken.model)
            try:
                if not await self._fold_rounds_into_user(task_id, taken, writer):
                    return
            except Exception as exc:
                exc.add_note(f"user {taken.user.user_id!r} of app {taken.user.sdk_app_id!r}, profile {taken.user.profile!r}")
                raise
        # Else the profile is gone or keeps no users' memory now: its rounds are let go.
        await self._db.run_in_background(store.mark_user_folded, task_id, self._me, taken.up_to_seq)
        await self._db.run_in_background(store.release, task_id, self._me)
        self._user_folds_done += 1

    async def _fold_rounds_into_user(self, task_id: str, taken: store.UserFold, writer: Writer) -> bool:
        """False: the task was deleted meanwhile, or another process took it over."""
        through = taken.after_seq
        while through < taken.up_to_seq:
            rounds = await self._db.run_in_background(store.rounds_after, task_id, through, taken.up_to_seq, BATCH_ROUNDS)
            if not rounds:
                break
            messages = [m for _seq, messages in rounds for m in messages]
            for _attempt in range(MOVED_RETRIES):
                known = await self._db.run_in_background(store.user_memory, taken.user)
                text = await fold(writer, USER_INSTRUCTIONS, known[0] if known else "", messages, deadline_s=self._fold_timeout_s)
                try:
                    written = await self._db.run_in_background(
                        store.write_user_memory, task_id, self._me, taken, rounds[-1][0], text, known[1] if known else None
                    )
                    break
                except store.MemoryMoved:
                    continue
            else:
                raise RuntimeError(f"the user's memory changed under {MOVED_RETRIES} folds in a row")
            if written is None:
                return False
            through = rounds[-1][0]
            MEMORY_SUMMARIES.labels("user_written").inc()
        return True

    async def _sweep_forever(self) -> None:
        """Tasks that went idle (or ended in a process that died before folding them) are
        folded into their users' memory by whichever process finds them first; the first sweep
        right at the start, for what a stopped process left."""
        period = max(0.5, min(60.0, self._user_idle_s / 2))
        while True:
            while await self.sweep():
                pass
            await asyncio.sleep(period)

    async def sweep(self) -> bool:
        """Fold one batch of due tasks into their users' memory and wait for it; True when the
        batch was full and moved on, so more are likely due now."""
        try:
            idle_before = datetime.now(timezone.utc) - timedelta(seconds=self._user_idle_s)
            due = await self._db.run_in_background(store.due_user_folds, idle_before, SWEEP_TASKS)
        except Exception as exc:  # the database is down: try again next time
            log.warning("memory sweep failed: %s", exc, extra={"fold": "sweep"})
            return False
        done_before = self._user_folds_done
        for task_id in due:
            self.task_ended(task_id)
        jobs = [self._jobs[task_id] for task_id in due if task_id in self._jobs]
        if jobs:
            await asyncio.wait(jobs)  # not gather: stopping the sweep must not cancel the folds
        return len(due) == SWEEP_TASKS and self._user_folds_done > done_before


def _failed(kind: str, exc: Exception) -> None:
    MEMORY_SUMMARIES.labels("failed").inc()
    notes = "; ".join(getattr(exc, "__notes__", []))
    log.warning("memory not written (%s fold): %s: %s%s", kind, type(exc).__name__, exc, f" ({notes})" if notes else "",
                extra={"fold": kind})
