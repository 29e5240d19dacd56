"""A quick acknowledgement while the main model thinks (a profile's `fast_reply`).

A race, never a queue: the small model is asked when the main one is, and its line is spoken
only if the main model has said nothing `after_ms` into the round, at `after_ms` or as soon as
the line is whole, whichever is later. Whenever the main model's first text (or tool call) comes
first, the line is dropped, ready or not; the main model's first text is never held back for it.
A line that fails, hangs, is empty, longer than `max_chars` or has nothing to speak is dropped
too (logged, counted) and changes nothing else. A spoken line is part of the reply as sent and
stored (`LiveRound`'s prelude), so the next round, the 905 cut and the admin API all see it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Sequence

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from core.errors import ApiError
from core.metrics import LLM_FAST_REPLIES, LLM_FAST_REPLY_TOKENS
from llm_proxy.agents import Agent
from llm_proxy.context import Msg
from llm_proxy.knowledge_context import user_text
from llm_proxy.live_round import UpstreamCall
from llm_proxy.profiles import FastReplyConfig
from llm_proxy.tools.registry import ToolRegistry

log = logging.getLogger("trtc.llm")

DEFAULT_PROMPT = (
    "You say the first words of a voice assistant while it looks up its answer: one short, natural "
    "acknowledgement of what the user said, in the user's language, at most {max_chars} characters, such as "
    "\"Sure, let me check that.\" or \"好的，我查一下。\" Never answer the question, never ask one, never greet. "
    "Reply with the acknowledgement only."
)
# What the main model is told when a line may have been spoken before its answer.
SPOKEN_NOTE = (
    "A short acknowledgement (such as \"Sure, let me check.\") may already have been spoken to the user for "
    "this message. Do not greet or acknowledge again, and say nothing before a tool call: start with the answer."
)
# However long the main model takes, the small one is given up on after this.
LINE_TIMEOUT_S = 10.0
# The user's words the small model is given, at most.
_TURN_CHARS = 2000
# A letter of any script: a line without one has nothing to say.
_LETTER = re.compile(r"[^\W\d_]")
_ENDS_SENTENCE = "。！？!?.…~～"


def spoken_line(text: str, max_chars: int) -> str | None:
    """The line as it is spoken: whitespace tidied, a sentence end added where it has none,
    and after Western text a space, so the reply that follows never runs into it ("moment.The").
    None when it is empty, longer than `max_chars` or has no letter."""
    line = " ".join(text.split()).rstrip(",，、:：;；-— ")
    if not line or len(line) > max_chars or not _LETTER.search(line):
        return None
    cjk = bool(re.search(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]", line))
    if line[-1] not in _ENDS_SENTENCE:
        line += "。" if cjk else "."
    return line if line[-1] in "。！？～…" else line + " "


# What a round's line is asked with: the small model's call, the profile's settings, the user's
# turn, the profile's name.
FastStart = tuple[UpstreamCall, FastReplyConfig, str, str]


def fast_start(agent: Agent, model: str, head: Sequence[Msg], streamed: bool) -> FastStart | None:
    """How to ask this round's line, or None: the profile has no fast reply, the reply is not
    streamed (a client that waits for the whole answer hears nothing sooner), or the round has no
    user words (a client's tool results)."""
    config = agent.profile.fast_reply
    turn = user_text(head) if head and head[-1]["role"] == "user" else ""
    if config is None or agent.fast_upstream is None or not streamed or not turn.strip():
        return None
    call = UpstreamCall(
        model=config.upstream.model or model,
        params={"max_tokens": config.max_chars + 16, "temperature": 0.3, **config.upstream.params},
        include_usage=True,
        tools=None,
        registry=_NO_TOOLS,
        upstream=agent.fast_upstream,
        profile=agent.name,
        upstream_label=config.upstream.label,
        strip_reasoning=True,
        speakable=True,
    )
    return call, config, turn, agent.name


_NO_TOOLS = ToolRegistry([], default_timeout_s=1.0)


class FastLine:
    """One round's line: asked at once, then raced against the main model's first token."""

    def __init__(self, call: UpstreamCall, config: FastReplyConfig, turn: str, profile: str) -> None:
        self.config = config
        self.profile = profile
        prompt = (config.prompt or DEFAULT_PROMPT).replace("{max_chars}", str(config.max_chars))
        messages: list[BaseMessage] = [SystemMessage(prompt), HumanMessage(turn[:_TURN_CHARS])]
        self._failed = False
        self._task = asyncio.create_task(self._ask(call, messages), name="fast-reply")

    def _fail(self, reason: str) -> None:
        self._failed = True
        LLM_FAST_REPLIES.labels(self.profile, "failed").inc()
        log.warning("fast reply of profile %s not spoken: %s", self.profile, reason)

    async def _ask(self, call: UpstreamCall, messages: list[BaseMessage]) -> str | None:
        said: list[str] = []
        size = 0
        stream = call.stream(messages)
        try:
            async with asyncio.timeout(LINE_TIMEOUT_S):
                async for delta in stream:
                    if delta.usage:
                        LLM_FAST_REPLY_TOKENS.labels(self.profile).inc(delta.usage.get("completion_tokens") or 0)
                    said.append(delta.text)
                    size += len(delta.text)
                    if size > self.config.max_chars + 20:  # room for whitespace the tidying takes out
                        self._fail(f"longer than {self.config.max_chars} characters")
                        return None
        except TimeoutError:
            self._fail(f"no whole line within {LINE_TIMEOUT_S:g} s")
            return None
        except ApiError as error:
            self._fail(f"{error.code}: {error.message}")
            return None
        except Exception as exc:  # whatever the small model did, the round goes on without its line
            self._fail(f"{type(exc).__name__}: {exc}")
            return None
        finally:
            await stream.aclose()
        line = spoken_line("".join(said), self.config.max_chars)
        if line is None:
            self._fail(f"nothing speakable within {self.config.max_chars} characters: {''.join(said)[:80]!r}")
        return line

    async def race(self, main: asyncio.Future[Any], started: float) -> str | None:
        """The line to speak now, or None: the main model answered (or failed) first, or the line
        failed. Returns as soon as `main` is done, the line never holding it back."""
        remaining = self.config.after_ms / 1000 - (time.perf_counter() - started)
        if remaining > 0:
            await asyncio.wait({main}, timeout=remaining)
        while not main.done():
            if self._task.done():
                line = self._task.result()
                if line is None:
                    await asyncio.wait({main})
                    break
                LLM_FAST_REPLIES.labels(self.profile, "spoken").inc()
                return line
            await asyncio.wait([main, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not self._failed:
            LLM_FAST_REPLIES.labels(self.profile, "dropped").inc()
        self.cancel()
        return None

    def cancel(self) -> None:
        self._task.cancel()
