"""What the upstream reads besides the new turn, asked of a short list of sources in order: the
history window (the stored rounds the service read with its claim), memory (the task's rolling
summary and the rounds it does not cover yet, the user's memory: `memory/`), knowledge (this
turn's passages: `knowledge/`). Each source adds to the round's `RoundContext`; `serving.py` only
asks for the whole. Memory and knowledge are wired in by the app; without them a round has its
window and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from langchain_core.messages import BaseMessage

from core.settings import Settings
from llm_proxy.agents import Agent
from llm_proxy.context import Msg, StoredRound, upstream_messages, window
from llm_proxy.fast_reply import SPOKEN_NOTE
from llm_proxy.knowledge_context import KnowledgeSource, previous_user_text, user_text
from llm_proxy.memory_context import MemoryKeeper, user_key, with_summary
from llm_proxy.profiles import PromptContext, template_fields
from llm_proxy.store import Claim


@dataclass(frozen=True)
class RoundInputs:
    """What the sources may read of a round."""

    agent: Agent
    # The request's system messages, and the messages the round starts with (its new turn).
    system: list[Msg]
    head: list[Msg]
    prompt: PromptContext
    # The task's finished rounds as read, newest first (none for a stateless request), and its claim.
    loaded: Sequence[StoredRound] = ()
    claim: Claim | None = None
    # The model the round's first upstream is asked with (memory's folds use it too).
    model: str = ""
    # A fast reply's line may be spoken before the answer (`fast_reply`): the model is told.
    fast_reply: bool = False


@dataclass(frozen=True)
class RoundContext:
    history: list[StoredRound]
    prompt: PromptContext
    # Just before the turn, never stored (this turn's knowledge section).
    before_turn: list[Msg] = field(default_factory=list)
    # What the round records of the knowledge it was given (base, document, chunk, score).
    knowledge: list[dict[str, Any]] | None = None

    def messages(self, inputs: RoundInputs) -> list[BaseMessage]:
        """The whole request for the upstream."""
        system = inputs.agent.system(inputs.system, self.prompt)
        return upstream_messages(system, self.history, inputs.head, self.before_turn)


class ContextSources:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Rolling summaries and users' memory (`memory.keeper.Keeper`).
        self.memory: MemoryKeeper | None = None
        # The knowledge bases (`knowledge.for_rounds.RoundKnowledge`).
        self.knowledge: KnowledgeSource | None = None

    async def build(self, inputs: RoundInputs) -> RoundContext:
        limits = inputs.agent.profile.history
        settings = self.settings
        window_rounds = settings.history_max_rounds if limits.max_rounds is None else limits.max_rounds
        max_tokens = settings.history_max_tokens if limits.max_tokens is None else limits.max_tokens
        context = RoundContext(history=window(inputs.loaded, window_rounds, max_tokens), prompt=inputs.prompt)
        context = await self._remember(inputs, context, window_rounds)
        context = await self._knowledge(inputs, context)
        if inputs.fast_reply:
            context = replace(context, before_turn=[*context.before_turn, {"role": "system", "content": SPOKEN_NOTE}])
        return context

    def _older_rounds(self, loaded: Sequence[StoredRound], window: Sequence[StoredRound]) -> bool:
        """Whether the task has rounds older than the window: some loaded ones were left out,
        or as many were loaded as are ever read (older ones then exist in the store)."""
        return len(window) < len(loaded) or len(loaded) >= self.settings.history_max_rounds

    async def _remember(self, inputs: RoundInputs, context: RoundContext, window_rounds: int) -> RoundContext:
        """What memory holds for the round: the user's memory as the task began, the task's
        summary and the rounds it does not cover yet. A batch of rounds waiting to be folded is
        asked for in the background: the round does not wait for it."""
        agent, claim, prompt = inputs.agent, inputs.claim, context.prompt
        memory = agent.profile.memory
        if self.memory is None or claim is None or not (memory.summary or memory.per_user):
            return context
        user = user_key(memory, agent.name, prompt.sdk_app_id, prompt.user_id, prompt.meta)
        if user is None and not self._older_rounds(inputs.loaded, context.history):
            return context  # the whole conversation fits its window: nothing to read
        view = await self.memory.view(claim.task_id, claim.edits, user, inputs.model)
        history, summary = context.history, None
        if memory.summary:
            history, fold_to = with_summary(inputs.loaded, history, view, claim.seq, window_rounds)
            if fold_to is not None:
                self.memory.fold_up_to(claim.task_id, fold_to, agent, inputs.model)
            summary = view.summary
        return replace(context, history=history, prompt=replace(prompt, summary=summary, user_memory=view.user_memory))

    async def _knowledge(self, inputs: RoundInputs, context: RoundContext) -> RoundContext:
        """The passages the profile's bases give this turn (`knowledge.mode: auto`): at
        `{knowledge}` where the prompt template places it, else in a section just before the
        turn. A short follow-up is searched with the user's turn before it: the task's last
        stored round's, or a stateless request's own earlier one."""
        config = inputs.agent.profile.knowledge
        turn = user_text(inputs.head)
        if self.knowledge is None or config is None or config.mode != "auto" or not turn:
            return context
        if inputs.loaded:
            previous = previous_user_text(inputs.loaded[0].messages, turn_included=False)
        else:
            previous = previous_user_text(inputs.head, turn_included=True)
        found = await self.knowledge.for_turn(config, turn, previous)
        if found is None:
            return context
        template = inputs.agent.profile.system_prompt
        if template is not None and "knowledge" in template_fields(template):
            return replace(context, prompt=replace(context.prompt, knowledge=found.text), knowledge=found.records())
        return replace(context, before_turn=[{"role": "system", "content": found.text}], knowledge=found.records())
