"""Folding the rounds that leave a task's history window into its rolling summary, in the
background: a live round only reads the summary written so far and asks for the fold; it never
waits for the memory upstream. A slow or failing summarizer delays the summary (logged, counted
on /metrics as `trtc_memory_summaries_total{outcome="failed"}`); the task's next round asks again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from langchain_core.messages import HumanMessage, SystemMessage

from core.db import Database
from core.metrics import MEMORY_SUMMARIES
from llm_proxy.agents import Agent, UpstreamClients
from llm_proxy.context import Msg
from llm_proxy.upstream import Upstream
from memory import store

log = logging.getLogger("trtc.memory")

# Rounds folded per call of the memory upstream.
BATCH_ROUNDS = 20

_INSTRUCTIONS = (
    "You keep the running summary of a voice conversation between a user and an assistant, so "
    "the assistant remembers what was said before the recent turns. Merge the summary so far with "
    "the new exchanges into one summary of at most {max_chars} characters. Keep names, facts about "
    "the user, preferences, decisions and open questions; leave out small talk. Plain sentences, "
    "no markdown."
)


@dataclass(frozen=True)
class Writer:
    """Who writes a task's summary: the memory upstream, its model, the summary's size."""

    upstream: Upstream
    model: str
    max_chars: int


class Summarizer:
    def __init__(self, db: Database, clients: UpstreamClients, instance_id: str) -> None:
        self._db = db
        self._clients = clients
        self._me = instance_id
        # The newest round each task's summary should cover, and the job folding it.
        self._wanted: dict[str, int] = {}
        self._jobs: dict[str, asyncio.Task[None]] = {}

    async def text(self, task_id: str) -> str | None:
        return await self._db.run(store.read, task_id)

    def fold_up_to(self, task_id: str, up_to_seq: int, agent: Agent, model: str) -> None:
        """Ask for the task's rounds up to `up_to_seq` in its summary, written by the profile's
        memory upstream (its own upstream, and the round's model, unless `memory.upstream` says
        otherwise); returns at once."""
        self._wanted[task_id] = max(up_to_seq, self._wanted.get(task_id, 0))
        if task_id in self._jobs:
            return  # the running job goes on to what is wanted now
        memory = agent.profile.memory
        if memory.upstream is None:
            writer = Writer(agent.upstream, model, memory.max_chars)
        else:
            writer = Writer(self._clients.get(memory.upstream), memory.upstream.model or model, memory.max_chars)
        self._jobs[task_id] = asyncio.create_task(self._run(task_id, writer))

    async def stop(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)

    async def _run(self, task_id: str, writer: Writer) -> None:
        try:
            done = 0
            while self._wanted[task_id] > done:
                done = self._wanted[task_id]
                await self._fold(task_id, done, writer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the memory upstream or the database: the next round asks again
            MEMORY_SUMMARIES.labels("failed").inc()
            log.warning("summary not written: %s: %s", type(exc).__name__, exc, extra={"task_id": task_id})
        finally:
            self._jobs.pop(task_id, None)
            self._wanted.pop(task_id, None)

    async def _fold(self, task_id: str, up_to_seq: int, writer: Writer) -> None:
        taken = await self._db.run(store.take, task_id, self._me)
        if taken is None:
            return  # another process writes it now
        through, text = taken
        try:
            while through < up_to_seq:
                rounds = await self._db.run(store.rounds_after, task_id, through, up_to_seq, BATCH_ROUNDS)
                if not rounds:
                    return
                text = await _summarize(writer, text, [m for _seq, messages in rounds for m in messages])
                if await self._db.run(store.write, task_id, self._me, rounds[-1][0], text):
                    through = rounds[-1][0]
                    MEMORY_SUMMARIES.labels("written").inc()
                    continue
                taken = await self._db.run(store.take, task_id, self._me)  # a 905 changed a covered round
                if taken is None:
                    return
                through, text = taken
        finally:
            await self._db.run(store.release, task_id, self._me)


async def _summarize(writer: Writer, previous: str, messages: list[Msg]) -> str:
    exchanges = "\n".join(
        f"{'User' if m['role'] == 'user' else 'Assistant'}: {m.get('content') or ''}"
        for m in messages
        if m["role"] in ("user", "assistant") and m.get("content")
    )
    prompt = [
        SystemMessage(content=_INSTRUCTIONS.format(max_chars=writer.max_chars)),
        HumanMessage(content=f"Summary so far:\n{previous or '(none)'}\n\nNew exchanges:\n{exchanges}"),
    ]
    parts = [delta.text async for delta in writer.upstream.stream(prompt, model=writer.model, params={}, include_usage=False) if delta.text]
    return "".join(parts).strip()[: writer.max_chars]
