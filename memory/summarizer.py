"""What the memory upstream is asked: fold new exchanges into a text kept so far, either a task's
rolling summary or what is remembered about a user across their tasks."""

from __future__ import annotations

from dataclasses import dataclass

from langchain_core.messages import HumanMessage, SystemMessage

from llm_proxy.agents import Agent, UpstreamClients
from llm_proxy.context import Msg
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


async def fold(writer: Writer, instructions: str, previous: str, messages: list[Msg]) -> str:
    """The text so far with the exchanges in `messages` folded in, cut to `max_chars`."""
    exchanges = "\n".join(
        f"{'User' if m['role'] == 'user' else 'Assistant'}: {m.get('content') or ''}"
        for m in messages
        if m["role"] in ("user", "assistant") and m.get("content")
    )
    prompt = [
        SystemMessage(content=instructions.format(max_chars=writer.max_chars)),
        HumanMessage(content=f"Summary so far:\n{previous or '(none)'}\n\nNew exchanges:\n{exchanges}"),
    ]
    parts = [delta.text async for delta in writer.upstream.stream(prompt, model=writer.model, params={}, include_usage=False) if delta.text]
    return "".join(parts).strip()[: writer.max_chars]
