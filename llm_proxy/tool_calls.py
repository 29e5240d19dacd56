"""Tool calls as the proxy handles them: streamed fragments put together into whole calls, and
the calls of a turn run or handed to the client. Plain functions and one small class, tested
directly."""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

from llm_proxy.context import INTERRUPTED_RESULT, Msg
from llm_proxy.tools.registry import ToolRegistry, round_findings
from llm_proxy.upstream import CallFragment


class CallAccumulator:
    """Whole calls from the fragments of one streamed turn (keyed by their index, as OpenAI
    streams them: id and name in the first fragment, the arguments in pieces)."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, fragments: Iterable[CallFragment]) -> None:
        for fragment in fragments:
            call = self._calls.setdefault(fragment.index, {"id": None, "name": "", "arguments": ""})
            if fragment.id:
                call["id"] = fragment.id
            if fragment.name and fragment.name != call["name"]:
                # Some servers split a long name over fragments; others repeat it whole.
                call["name"] += fragment.name
            call["arguments"] += fragment.arguments

    def calls(self) -> list[dict[str, Any]]:
        """The turn's calls in the OpenAI message format, in index order."""
        return [
            {
                "id": call["id"] or f"call_{index}",
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"] or "{}"},
            }
            for index, call in sorted(self._calls.items())
        ]


def call_name(call: dict[str, Any]) -> str:
    return call["function"]["name"]


async def run_calls(
    registry: ToolRegistry, calls: list[dict[str, Any]], findings: list[dict[str, Any]] | None = None
) -> list[Msg]:
    """Run a turn's calls concurrently; each result is a `tool` message, failures included.
    `findings`: where the tools put what the round records with it (`round_findings`)."""
    token = round_findings.set(findings)
    try:
        results = await asyncio.gather(
            *(registry.run_call(call_name(call), call["function"]["arguments"]) for call in calls)
        )
    finally:
        round_findings.reset(token)
    return [
        {"role": "tool", "tool_call_id": call["id"], "content": result}
        for call, result in zip(calls, results)
    ]


def answer_missing(messages: list[Msg]) -> list[Msg]:
    """`messages` with an 'interrupted' result after every call that has none, so a round cut
    off while its tools ran is still a valid sequence."""
    answered = {m.get("tool_call_id") for m in messages if m["role"] == "tool"}
    out: list[Msg] = []
    for message in messages:
        out.append(message)
        for call in message.get("tool_calls") or [] if message["role"] == "assistant" else []:
            if call["id"] not in answered:
                out.append({"role": "tool", "tool_call_id": call["id"], "content": INTERRUPTED_RESULT})
    return out
