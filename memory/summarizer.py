"""What the memory upstream is asked: fold new exchanges into a text kept so far, either a task's
rolling summary or what is remembered about a user across their tasks."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from llm_proxy.agents import Agent, UpstreamClients
from llm_proxy.context import Msg
from llm_proxy.speech import ThinkFilter
from llm_proxy.upstream import Upstream

SUMMARY_INSTRUCTIONS = (
    "You keep the running summary of a voice conversation between a user and an assistant, so "
    "the assistant remembers what was said before the recent turns. Merge the summary so far with "
    "the new exchanges into one summary of at most {max_chars} characters. Keep names, facts about "
    "the user, preferences, decisions and open questions; leave out small talk. Plain sentences, "
    "no markdown."
)
USER_INSTRUCTIONS = (
    "You keep what an assistant remembers about one user across separate conversations. Merge the "
    "memory so far with what the user said and learnt in the new exchanges into one text of at "
    "most {max_chars} characters: names, facts about the user and the people in their life, "
    "preferences, plans and promises made. Drop what the new exchanges show to be wrong or out of "
    "date, and leave out small talk and the conversation's own course. Plain sentences, no markdown."
)


@dataclass(frozen=True)
class Writer:
    """Who writes a memory text: the memory upstream, its model, the text's size."""

    upstream: Upstream
    model: str
    max_chars: int

    @staticmethod
    def of(agent: Agent, clients: UpstreamClients, model: str) -> Writer:
        """The profile's memory upstream: `memory.upstream` if set, else the profile's own
        upstream with the round's model."""
        memory = agent.profile.memory
        if memory.upstream is None:
            return Writer(agent.upstream, model, memory.max_chars)
        return Writer(clients.get(memory.upstream), memory.upstream.model or model, memory.max_chars)


class FoldFailed(Exception):
    """The memory upstream gave no text to keep (nothing but whitespace or reasoning, or nothing
    in time): the memory stays as it was, and the fold counts as failed and is asked again."""


# How many characters of the raw answer (think blocks included) are read per character kept:
# a model that reasons first still gets its answer in, one that never stops is cut off.
_RAW_PER_KEPT = 4
_RAW_SLACK = 16_000


async def fold(writer: Writer, instructions: str, previous: str, messages: list[Msg], *, deadline_s: float) -> str:
    """The text so far with the exchanges in `messages` folded in, cut to `max_chars`.

    The answer is bounded three ways, since nothing in it can be trusted: the upstream is asked for
    at most `2 * max_chars` tokens (a token is at least a character in the tokenizers in use, and
    a reasoning model's think block needs room too), reading stops once `max_chars` characters of
    answer (or `4 * max_chars + 16,000` of raw text) have come, and the whole call has `deadline_s`.
    `<think>` blocks are taken out, as from live rounds."""
    exchanges = "\n".join(
        f"{'User' if m['role'] == 'user' else 'Assistant'}: {m.get('content') or ''}"
        for m in messages
        if m["role"] in ("user", "assistant") and m.get("content")
    )
    prompt: list[BaseMessage] = [
        SystemMessage(content=instructions.format(max_chars=writer.max_chars)),
        HumanMessage(content=f"Summary so far:\n{previous or '(none)'}\n\nNew exchanges:\n{exchanges}"),
    ]
    params = {"max_tokens": 2 * writer.max_chars}
    try:
        async with asyncio.timeout(deadline_s):
            text = await _bounded_answer(writer, prompt, params)
    except TimeoutError:
        raise FoldFailed(f"the memory upstream did not answer within {deadline_s:g} s") from None
    text = text.strip()[: writer.max_chars].strip()
    if not text:
        raise FoldFailed("the memory upstream answered no text")
    return text


async def _bounded_answer(writer: Writer, prompt: list[BaseMessage], params: dict[str, int]) -> str:
    think = ThinkFilter()
    kept: list[str] = []
    kept_chars = raw_chars = 0
    raw_limit = _RAW_PER_KEPT * writer.max_chars + _RAW_SLACK
    # `aclosing`: stopping early closes the response, which stops the upstream generating.
    async with aclosing(writer.upstream.stream(prompt, model=writer.model, params=params, include_usage=False)) as deltas:
        async for delta in deltas:
            if not delta.text:
                continue
            raw_chars += len(delta.text)
            piece = think.feed(delta.text)
            kept.append(piece)
            kept_chars += len(piece)
            # Leading whitespace is stripped later: keep reading until the bound holds without it.
            if kept_chars > writer.max_chars + 64 or raw_chars > raw_limit:
                break
        else:
            kept.append(think.flush())
    return "".join(kept)
