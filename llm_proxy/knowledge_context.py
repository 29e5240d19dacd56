"""What a round's context takes from the knowledge bases (`knowledge/`, wired by the app): the
passages for the user's turn, as a system section just before the turn or as `{knowledge}` in
the prompt template. The chat proxy knows knowledge only through `KnowledgeSource`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from llm_proxy.context import Msg
from llm_proxy.profiles import KnowledgeConfig, PromptContext, template_fields

if TYPE_CHECKING:
    from llm_proxy.agents import Agent


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


@dataclass(frozen=True)
class RoundKnowledgeView:
    """The knowledge a round gives its model, and how."""

    found: Found | None = None

    @property
    def records(self) -> list[dict[str, Any]] | None:
        return self.found.records() if self.found is not None else None

    def context(self, context: PromptContext) -> PromptContext:
        """The prompt context with the passages, for a template that places `{knowledge}`."""
        return replace(context, knowledge=self.found.text) if self.found is not None else context

    def before_turn(self, agent: Agent) -> list[Msg]:
        """The system section just before the user's turn, where the template does not place them."""
        prompt = agent.profile.system_prompt
        if self.found is None or (prompt is not None and "knowledge" in template_fields(prompt)):
            return []
        return [{"role": "system", "content": self.found.text}]


NO_KNOWLEDGE = RoundKnowledgeView()
