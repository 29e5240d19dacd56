"""Matching 905's text to a stored reply and cutting it (`orchestrator/heard.py`), directly."""

from __future__ import annotations

from llm_proxy.context import StoredRound, history_messages
from orchestrator.heard import cut_reply, heard_length, normalized


def test_spacing_punctuation_width_and_case_do_not_count() -> None:
    assert normalized("Hello, World!  ")[0] == "helloworld"
    assert normalized("你好，世界！")[0] == normalized("你好, 世界!")[0] == "你好世界"
    assert normalized("ＡＢＣ１２３")[0] == "abc123"  # full-width letters and digits
    assert normalized("Great 😀 job")[0] == "greatjob"


def test_the_cut_falls_after_the_last_word_heard_and_its_punctuation() -> None:
    reply = "Hello there. How are you today?"
    assert heard_length(reply, "Hello there") == len("Hello there.")
    assert heard_length(reply, "hello THERE how") == len("Hello there. How")
    assert heard_length(reply, reply) == len(reply)
    assert heard_length(reply, "Goodbye") is None
    assert heard_length(reply, "") is None
    assert heard_length("今天天气很好，我们去公园吧。", "今天天气很好,") == len("今天天气很好，")


def test_a_cut_inside_a_tool_exchange_keeps_a_valid_sequence() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check. ", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny and warm today."},
    ]
    reply = "Let me check. It is sunny and warm today."
    late = cut_reply(messages, heard_length(reply, "Let me check. It is sunny") or 0)
    assert [m.get("content") for m in late.messages] == ["Weather?", "Let me check. ", "sunny", "It is sunny"]
    assert late.unheard == " and warm today."

    early = cut_reply(messages, heard_length(reply, "Let me") or 0)
    assert early.messages[1] == {"role": "assistant", "content": "Let me", "tool_calls": [call]}
    assert early.unheard == " check. It is sunny and warm today."
    # The answer nobody heard is left out of later contexts; the call keeps its result.
    assert history_messages([StoredRound(1, 0, early.messages)]) == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
