"""What the upstream sees: the request's system prompt, the stored history window, the new turn.

Plain functions over message dicts, so the rules can be tested without a server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence, TypeVar

from langchain_core.messages import AIMessage, BaseMessage, convert_to_messages
from pydantic import Field, SkipValidation

from core.errors import bad_request
from llm_proxy.protocol import ChatMessage

Msg = dict[str, Any]

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def estimate_tokens(text: str | None) -> int:
    """A tokenizer-free estimate (no BPE files to download at run time): one token per CJK
    character, one per four other characters, plus the per-message overhead of chat formats."""
    if not text:
        return 4
    cjk = len(_CJK.findall(text))
    return 4 + cjk + (len(text) - cjk + 3) // 4


def message_tokens(message: Msg) -> int:
    tokens = estimate_tokens(message.get("content"))
    if message.get("tool_calls"):
        tokens += estimate_tokens(str(message["tool_calls"]))
    return tokens


# The result stored for a tool call that was still running when the client went away: the
# call stays answered (a call without a result is invalid upstream), and a retry runs it again.
INTERRUPTED_RESULT = '{"error": "interrupted: the user spoke before this tool finished"}'


@dataclass(frozen=True)
class Turn:
    system: list[Msg]
    new: list[Msg]
    # Only `tool` results, for the client tools the task's last round called: they continue
    # that round instead of starting one.
    continues: bool = False


# The roles of system prompts: the request's own, which the profile may replace.
SYSTEM_ROLES = ("system", "developer")


def split_turn(messages: Sequence[ChatMessage]) -> Turn:
    """System messages come from the request; the new turn is what follows its last assistant
    message. Anything before that is the orchestrator's own copy of the history, which the
    store already holds, so it is dropped rather than sent twice."""
    system = [m.to_dict() for m in messages if m.role in SYSTEM_ROLES]
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    new = [m.to_dict() for m in messages[last_assistant + 1 :] if m.role not in SYSTEM_ROLES]
    if any(m["role"] == "user" for m in new):
        return Turn(system=system, new=new)
    if new and all(m["role"] == "tool" and m.get("tool_call_id") for m in new):
        return Turn(system=system, new=new, continues=True)
    raise bad_request(
        "The request has no new user message (or tool results) after its last assistant message.", "no_user_message"
    )


def unanswered_calls(messages: Sequence[Msg]) -> list[dict[str, Any]]:
    """The calls of the last assistant message that have no `tool` result after it."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message["role"] == "assistant":
            answered = {m.get("tool_call_id") for m in messages[index + 1 :] if m["role"] == "tool"}
            return [call for call in message.get("tool_calls") or [] if call.get("id") not in answered]
    return []


def replayed_reply(messages: Sequence[Msg]) -> Msg:
    """A stored round's reply as a retry gets it again: its last assistant text, with the calls
    that still wait for the client's results."""
    last = next((m for m in reversed(messages) if m["role"] == "assistant"), {})
    reply: Msg = {"role": "assistant", "content": last.get("content") or ""}
    calls = unanswered_calls(messages)
    if calls:
        reply["tool_calls"] = calls
    return reply


def finished_tool_exchanges(messages: Sequence[Msg]) -> list[Msg]:
    """The tool calls of a round whose results all came in (not cut off), with their results:
    what a retry of the round carries over instead of running the tools again."""
    results = {m.get("tool_call_id"): m for m in messages if m["role"] == "tool"}
    kept: list[Msg] = []
    for message in messages:
        calls = message.get("tool_calls") if message["role"] == "assistant" else None
        if not calls:
            continue
        answers = [results.get(call.get("id")) for call in calls]
        if all(answer is not None and answer.get("content") != INTERRUPTED_RESULT for answer in answers):
            kept += [message, *answers]  # type: ignore[list-item]
    return kept


@dataclass(slots=True, eq=False)
class StoredRound:
    """A finished round as the history window holds it. Kept in the per-process history cache for
    as long as its task is active, so it is a handful of plain objects, which the cyclic garbage
    collector can ignore: as langchain messages, a cached round was ~25 tracked objects, and one
    collection pass over a freshly loaded cache stalled every request for ~100 ms."""

    seq: int
    tokens: int
    messages: list[Msg]
    # The round's messages as the upstream request carries them, made once by the upstream client.
    request_form: tuple[Msg, ...] | None = None


class StoredHistory(BaseMessage):
    """The history window in a langchain message list: it stands in for the stored rounds'
    messages, which the upstream client puts in the request in its place, each round converted
    once (`StoredRound.request_form`) rather than on every request."""

    type: Literal["stored_history"] = "stored_history"
    rounds: SkipValidation[list[StoredRound]] = Field(default_factory=list, exclude=True)


class _Sized(Protocol):
    @property
    def tokens(self) -> int: ...


R = TypeVar("R", bound=_Sized)


def window(rounds_newest_first: Sequence[R], max_rounds: int, max_tokens: int) -> list[R]:
    """The newest whole rounds within both limits, oldest first."""
    chosen: list[R] = []
    total = 0
    for stored in rounds_newest_first[:max_rounds]:
        if total + stored.tokens > max_tokens:
            break
        total += stored.tokens
        chosen.append(stored)
    chosen.reverse()
    return chosen


def history_messages(rounds: Sequence[StoredRound]) -> list[Msg]:
    """Flatten rounds for the upstream, as a valid OpenAI message sequence: an interrupted reply
    that never got a word out is left out (the user's words stay; consecutive user messages are
    valid), and so is a tool call whose result never came (the client dropped its own tool)."""
    out: list[Msg] = []
    for stored in rounds:
        results = {m.get("tool_call_id") for m in stored.messages if m["role"] == "tool"}
        for message in stored.messages:
            if message["role"] == "assistant" and message.get("tool_calls"):
                calls = [call for call in message["tool_calls"] if call.get("id") in results]
                message = {**message, "tool_calls": calls} if calls else _without_calls(message)
            if message["role"] == "assistant" and not message.get("content") and not message.get("tool_calls"):
                continue
            out.append(message)
    return out


def _without_calls(message: Msg) -> Msg:
    return {key: value for key, value in message.items() if key != "tool_calls"}


def upstream_messages(
    system: list[Msg], history: Sequence[StoredRound], new: list[Msg], before_turn: Sequence[Msg] = ()
) -> list[BaseMessage]:
    """The whole request for the upstream: system prompt, history window, what goes just before
    the turn (this turn's knowledge, never stored), new turn."""
    stored = [StoredHistory(content="", rounds=list(history))] if history else []
    return [*as_langchain(system), *stored, *as_langchain(before_turn), *as_langchain(new)]


def as_langchain(messages: Sequence[Msg]) -> list[BaseMessage]:
    """Message dicts as langchain messages. Tool calls ride along as they came (in
    `additional_kwargs`, which ChatOpenAI sends unchanged): parsed, arguments that are not valid
    JSON would be refused, and valid ones re-serialized differently from what the model wrote."""
    out: list[BaseMessage] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            out.append(AIMessage(content=message.get("content") or "", additional_kwargs={"tool_calls": message["tool_calls"]}))
        else:
            out.extend(convert_to_messages([message]))
    return out
