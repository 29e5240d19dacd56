"""What a round's context takes from the knowledge bases (`knowledge/`, wired by the app): the
passages for the user's turn (`round_context` places them). The chat proxy knows knowledge only
through `KnowledgeSource`."""

from __future__ import annotations

from typing import Protocol, Sequence

from llm_proxy.context import Msg
from llm_proxy.profiles import KnowledgeConfig


class Found(Protocol):
    """Passages found for a turn (`knowledge.for_rounds.Found`)."""

    @property
    def text(self) -> str: ...

    def records(self) -> list[dict[str, object]]: ...


class KnowledgeSource(Protocol):
    async def for_turn(self, config: KnowledgeConfig, turn: str, previous: str | None) -> Found | None: ...


def user_text(messages: Sequence[Msg]) -> str:
    """The text of the last user message (its text parts, for a message in parts)."""
    for message in reversed(messages):
        if message["role"] == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            return str(content or "")
    return ""


def previous_user_text(messages: Sequence[Msg], *, turn_included: bool) -> str | None:
    """The user's turn before this one: the last user message of `messages` (the task's last
    stored round), or the one before the last (a stateless request's own history, which ends
    with the turn): what a short follow-up is searched with."""
    users = [m for m in messages if m["role"] == "user"]
    if turn_included:
        users = users[:-1]
    return user_text(users[-1:]) or None
