"""A round whose upstream has produced its first token, through to its stored messages.

`LiveRound.deltas` runs the tool loop: text streams to the client as it comes (so "let me check
the weather" is heard while the tool runs); when a turn ends in calls of server tools, the proxy
runs them (concurrently, each with a timeout), adds the assistant `tool_calls` message and the
`tool` results to the context and calls the upstream again, up to `TOOL_MAX_STEPS`, the last time
with `tool_choice: none`. Calls of the client's own tools end the round: they go back to the
client, whose next request brings their results (`Turn.continues`).

`close` stores the round once, with exactly the text the client received: its head (the user's
turn, and what a reopened round already had), the tool calls and results, then the final text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Protocol

import anyio
from langchain_core.messages import BaseMessage

from core.errors import ApiError
from core.metrics import LLM_ROUNDS, LLM_UPSTREAM_ERRORS
from llm_proxy.context import Msg, as_langchain
from llm_proxy.protocol import usage_dict
from llm_proxy.speech import spoken
from llm_proxy.store import Claim, Failure, RoundTiming
from llm_proxy.tool_calls import CallAccumulator, answer_missing, call_name, run_calls
from llm_proxy.tools.registry import ToolRegistry
from llm_proxy.upstream import Delta, Upstream

log = logging.getLogger("trtc.llm")


def elapsed_ms(started: float) -> int:
    """Milliseconds since `started` (a `time.perf_counter()` reading)."""
    return round((time.perf_counter() - started) * 1000)


@dataclass(frozen=True)
class UpstreamCall:
    """What every upstream call of one round shares."""

    model: str
    params: dict[str, Any]
    include_usage: bool
    # Server tools and the client's, merged (the client's win a name clash); None: no tools.
    tools: list[dict[str, Any]] | None
    # The profile's server tools, which the proxy runs, and the upstream it talks to.
    registry: ToolRegistry
    upstream: Upstream
    client_tools: frozenset[str] = field(default_factory=frozenset)
    # Recorded with the stored round: which profile and which upstream answered, and the
    # request's fields that are no OpenAI parameter (`ChatCompletionRequest.extra_fields`).
    profile: str | None = None
    upstream_label: str | None = None
    extra_fields: dict[str, Any] | None = None
    # Take `<think>` blocks out of the text (`speech.spoken`).
    strip_reasoning: bool = True
    # Give up on this upstream (for the profile's next) when no first token came within this.
    first_token_timeout_s: float | None = None
    # Take markdown, emoji and URLs out of the text (`speakable`).
    speakable: bool = False

    def stream(self, messages: list[BaseMessage], *, tool_choice: str | None = None) -> AsyncGenerator[Delta, None]:
        """One upstream call of the round, as the client will get its text."""
        deltas = self.upstream.stream(
            messages, model=self.model, params=self.params, include_usage=self.include_usage, tools=self.tools,
            tool_choice=tool_choice,
        )
        if self.strip_reasoning or self.speakable:
            return spoken(deltas, reasoning=self.strip_reasoning, speakable=self.speakable)
        return deltas


# An upstream call that gave its first delta: the call, its stream, that delta.
Started = tuple[UpstreamCall, AsyncGenerator[Delta, None], Delta]


async def abandon_started(pending: asyncio.Future[Started]) -> None:
    """An upstream call still waiting for its first token, given up: cancelled, and its stream
    closed if the token came meanwhile (no more tokens are paid for)."""
    pending.cancel()
    with anyio.CancelScope(shield=True):
        try:
            _call, stream, _first = await pending
        except BaseException:  # cancelled, or failed: nothing is left open
            return
        try:
            await stream.aclose()
        except Exception:  # closing a stream that already failed: its error is no one's now
            pass


class RoundKeeper(Protocol):
    """What a live round needs of the service that claimed it (`serving.ChatService`): to store
    its messages once, or to give the round back."""

    async def store(
        self, claim: Claim, messages: list[Msg], *, interrupted: bool, finish_reason: str | None,
        usage: dict[str, int] | None, call: UpstreamCall, timing: RoundTiming,
    ) -> None: ...

    async def release(self, claim: Claim, failure: Failure | None = None) -> None: ...


class LiveRound:
    def __init__(
        self,
        keeper: RoundKeeper,
        *,
        claim: Claim | None,
        head: list[Msg],
        context: list[BaseMessage],
        call: UpstreamCall,
        stream: AsyncGenerator[Delta, None] | None,
        first: Delta | None,
        started: float,
        completion_id: str,
        max_tool_steps: int,
        knowledge: list[dict[str, Any]] | None = None,
        prelude: str | None = None,
        pending: asyncio.Future[Started] | None = None,
    ) -> None:
        """`prelude`: a fast reply's line (`fast_reply`), said before the upstream's first text,
        which `pending` brings (the upstream call, its stream and first delta) when it comes; a
        round without a prelude has its `stream` and `first` delta already."""
        self._keeper = keeper
        self._max_tool_steps = max_tool_steps
        self._claim = claim
        self._head = head
        self._context = context
        self._call = call
        self._stream = stream
        self._first: Delta | None = first
        # When the request came (perf_counter), and how long its first token took.
        self._started = started
        self._first_token_ms = elapsed_ms(started)
        self._closed = False
        self._prelude = prelude
        self._pending = pending
        self.fast_reply = prelude
        # The knowledge passages given to the model: found before the call, or by its tools.
        self._knowledge: list[dict[str, Any]] = list(knowledge or [])
        # Tool calls and results of this round, and the length of the text streamed before them.
        self._produced: list[Msg] = []
        self._consumed = 0
        self.model = call.model
        self.include_usage = call.include_usage
        self.completion_id = completion_id
        self.finish_reason = "stop"
        self.usage: dict[str, int] | None = None
        # Calls of the client's own tools that end the round, in the OpenAI message format.
        self.client_calls: list[dict[str, Any]] = []

    async def deltas(self) -> AsyncIterator[Delta]:
        """The client's text deltas, through every step of the tool loop: at most
        `TOOL_MAX_STEPS` tool exchanges, whatever the upstream does (some model servers ignore
        `tool_choice: none` and call tools for ever)."""
        steps = 0
        said_any = False
        while True:
            accumulator = CallAccumulator()
            text: list[str] = []
            async for delta in self._step_deltas():
                if delta.calls:
                    accumulator.add(delta.calls)
                if delta.text:
                    text.append(delta.text)
                    said_any = True
                    yield delta
            calls = accumulator.calls()
            if not calls:
                return
            if steps >= self._max_tool_steps:
                self._end_tool_loop(said_any)
                return
            said = "".join(text)
            self._consumed += len(said)
            self._produced.append({"role": "assistant", "content": said, "tool_calls": calls})
            server_calls = [c for c in calls if call_name(c) not in self._call.client_tools]
            self._produced += await run_calls(self._call.registry, server_calls, self._knowledge)
            client_calls = [c for c in calls if call_name(c) in self._call.client_tools]
            if client_calls:
                self.client_calls = client_calls
                self.finish_reason = "tool_calls"
                return
            steps += 1
            last = steps >= self._max_tool_steps
            self._stream = self._call.stream(
                [*self._context, *as_langchain(self._produced)], tool_choice="none" if last else None
            )

    def _end_tool_loop(self, said_any: bool) -> None:
        """The upstream called tools again after `tool_choice: none`: its calls are dropped and
        the round ends with what it said, or, if it said nothing, with an error."""
        LLM_UPSTREAM_ERRORS.labels("tool_loop_exceeded").inc()
        log.warning("upstream called tools after %d tool steps and tool_choice none; the calls are dropped",
                    self._max_tool_steps)
        self.finish_reason = "stop"
        if not said_any:
            raise ApiError(
                502,
                f"Upstream kept calling tools after {self._max_tool_steps} tool steps (TOOL_MAX_STEPS) "
                "and said nothing.",
                "upstream_error",
                "tool_loop_exceeded",
            )

    async def _step_deltas(self) -> AsyncIterator[Delta]:
        if self._prelude is not None:
            prelude, self._prelude = self._prelude, None
            yield Delta(text=prelude)
        if self._pending is not None:
            # The upstream's first token (or its failure, after its fallbacks): the stream goes on.
            self._call, self._stream, self._first = await self._pending
            self._pending = None
            self.model = self._call.model
        assert self._stream is not None
        first, self._first = self._first, None
        if first is not None:
            self._note(first)
            yield first
        async for delta in self._stream:
            self._note(delta)
            yield delta

    def _note(self, delta: Delta) -> None:
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        if delta.usage:
            usage = usage_dict(delta.usage) or {}
            if self.usage:
                usage = {key: self.usage.get(key, 0) + value for key, value in usage.items()}
            self.usage = usage

    def messages(self, sent_text: str) -> list[Msg]:
        """The round as stored: head, tool calls and results (an unanswered call gets an
        'interrupted' result, unless it waits for the client), final text."""
        produced = self._produced if self.client_calls else answer_missing(self._produced)
        out = [*self._head, *produced]
        if not self.client_calls:
            out.append({"role": "assistant", "content": sent_text[self._consumed :]})
        return out

    async def close(self, sent_text: str, *, interrupted: bool, error: str | None = None) -> None:
        """Stop the upstream and store the round with what the client received (and `error`,
        the upstream's code, when it failed mid-reply). Runs once, shielded: it usually runs
        because the client went away and the task is being cancelled."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._stop_upstream()
            outcome = "interrupted" if interrupted else "completed"
            if self._claim is None:
                outcome = "stateless"
            else:
                await self._keeper.store(
                    self._claim,
                    self.messages(sent_text),
                    interrupted=interrupted,
                    finish_reason=None if interrupted else self.finish_reason,
                    usage=self.usage,
                    call=self._call,
                    timing=RoundTiming(self._first_token_ms, elapsed_ms(self._started), error, self._knowledge or None,
                                       self.fast_reply),
                )
            LLM_ROUNDS.labels(outcome).inc()

    async def _stop_upstream(self) -> None:
        """Stop paying for tokens: the upstream's stream closed, or its call still waiting for a
        first token cancelled (and closed, if it came meanwhile)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await abandon_started(pending)
        elif self._stream is not None:
            await self._stream.aclose()

    async def release(self, failure: Failure) -> None:
        """Give the round up: the upstream failed before the client got any of it
        (non-streaming), so the request failed and nothing is kept but the failure."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._stop_upstream()
            if self._claim is not None:
                await self._keeper.release(self._claim, failure)
            LLM_ROUNDS.labels("failed").inc()
