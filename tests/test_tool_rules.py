"""Tool-call handling as plain functions: fragments into calls, valid histories, the registry's
error results."""

from __future__ import annotations

import asyncio
import json

import pytest

from llm_proxy.context import (
    INTERRUPTED_RESULT,
    StoredRound,
    finished_tool_exchanges,
    history_messages,
    split_turn,
    unanswered_calls,
)
from llm_proxy.protocol import ChatMessage
from llm_proxy.tool_calls import CallAccumulator, answer_missing
from llm_proxy.tools.python_tools import as_tool
from llm_proxy.tools.registry import Tool, ToolConfigError, ToolRegistry
from llm_proxy.upstream import CallFragment


def _call(call_id: str, name: str = "f", arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_fragments_become_whole_calls_in_index_order() -> None:
    acc = CallAccumulator()
    acc.add([CallFragment(1, "b", "second", ""), CallFragment(0, "a", "first", '{"x"')])
    acc.add([CallFragment(0, None, None, ': 1}'), CallFragment(1, None, None, "{}")])
    assert acc.calls() == [_call("a", "first", '{"x": 1}'), _call("b", "second", "{}")]


def test_a_turn_of_tool_results_continues_the_round() -> None:
    messages = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="", tool_calls=[_call("a")]),
                ChatMessage(role="tool", content="r", tool_call_id="a")]
    turn = split_turn(messages)
    assert turn.continues and turn.new == [{"role": "tool", "content": "r", "tool_call_id": "a"}]
    assert not split_turn(messages[:1]).continues


def test_history_never_sends_a_call_without_its_result() -> None:
    dangling = StoredRound(1, 10, [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [_call("a"), _call("b")]},
        {"role": "tool", "content": "sunny", "tool_call_id": "a"},
    ])
    dropped = StoredRound(2, 10, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [_call("c")]}])
    assert history_messages([dangling, dropped]) == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [_call("a")]},
        {"role": "tool", "content": "sunny", "tool_call_id": "a"},
        {"role": "user", "content": "x"},
    ]


def test_unanswered_calls_and_interrupted_results() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [_call("a"), _call("b")]},
                {"role": "tool", "content": "r", "tool_call_id": "a"}]
    assert unanswered_calls(messages) == [_call("b")]
    filled = answer_missing(messages)
    assert {"role": "tool", "tool_call_id": "b", "content": INTERRUPTED_RESULT} in filled
    assert unanswered_calls(filled) == []
    # A retry carries over only exchanges whose every call finished.
    assert finished_tool_exchanges(filled) == []
    assert finished_tool_exchanges(messages[:2] + [messages[2], {"role": "tool", "content": "s", "tool_call_id": "b"}]) == [
        messages[1], messages[2], {"role": "tool", "content": "s", "tool_call_id": "b"}]


def test_plain_typed_functions_become_schema_tools() -> None:
    def add(a: int, b: int = 2) -> int:
        """Add two numbers."""
        return a + b

    tool = as_tool(add)
    assert tool.name == "add" and tool.description == "Add two numbers."
    assert tool.parameters["required"] == ["a"] and tool.parameters["properties"]["a"]["type"] == "integer"
    registry = ToolRegistry([tool], default_timeout_s=1)
    assert asyncio.run(registry.run_call("add", '{"a": 40}')) == "42"
    assert "not of type 'integer'" in json.loads(asyncio.run(registry.run_call("add", '{"a": "x"}')))["error"]


def test_results_are_text_and_bounded() -> None:
    async def big(_args: dict) -> object:
        return {"data": "x" * 20_000}

    registry = ToolRegistry([Tool("big", "", {"type": "object"}, big)], default_timeout_s=1)
    assert len(asyncio.run(registry.run_call("big", "{}"))) == 8000


def test_duplicate_and_unknown_names_are_configuration_errors() -> None:
    async def run(_args: dict) -> str:
        return ""

    tool = Tool("t", "", {"type": "object"}, run)
    with pytest.raises(ToolConfigError, match="Two tools are named 't'"):
        ToolRegistry([tool, tool], default_timeout_s=1)
    with pytest.raises(ToolConfigError, match="unknown tools: nope"):
        ToolRegistry([tool], default_timeout_s=1).narrowed(["nope"])
