"""The context rules as plain functions: turn splitting, token estimates, the history window."""

from __future__ import annotations

import json

import pytest

from core.errors import ApiError
from llm_proxy.context import StoredRound, estimate_tokens, history_messages, split_turn, window
from llm_proxy.protocol import ChatMessage, ChunkWriter


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]


def test_new_turn_is_everything_after_the_last_assistant_message() -> None:
    turn = split_turn(msgs(("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("user", "d")))
    assert turn.system == [{"role": "system", "content": "S"}]
    assert turn.new == [{"role": "user", "content": "c"}, {"role": "user", "content": "d"}]


def test_system_messages_anywhere_are_kept_and_not_part_of_the_turn() -> None:
    turn = split_turn(msgs(("system", "S1"), ("user", "a"), ("system", "S2")))
    assert [m["content"] for m in turn.system] == ["S1", "S2"]
    assert turn.new == [{"role": "user", "content": "a"}]


@pytest.mark.parametrize("pairs", [(("system", "S"),), (("user", "a"), ("assistant", "b"))])
def test_a_request_without_a_new_user_message_is_refused(pairs: tuple) -> None:
    with pytest.raises(ApiError) as caught:
        split_turn(msgs(*pairs))
    assert caught.value.status == 400


def test_token_estimate_counts_cjk_per_character() -> None:
    assert estimate_tokens("你好世界") == 4 + 4
    assert estimate_tokens("abcdefgh") == 4 + 2
    assert estimate_tokens("") == 4


def _round(seq: int, tokens: int) -> StoredRound:
    return StoredRound(seq, tokens, [{"role": "user", "content": str(seq)}, {"role": "assistant", "content": "r"}])


def test_window_keeps_the_newest_whole_rounds_within_both_limits() -> None:
    newest_first = [_round(5, 10), _round(4, 10), _round(3, 50), _round(2, 10), _round(1, 10)]
    assert [r.seq for r in window(newest_first, max_rounds=3, max_tokens=1000)] == [3, 4, 5]
    assert [r.seq for r in window(newest_first, max_rounds=10, max_tokens=69)] == [4, 5]
    assert [r.seq for r in window(newest_first, max_rounds=10, max_tokens=70)] == [3, 4, 5]
    assert window(newest_first, max_rounds=0, max_tokens=1000) == []
    assert window(newest_first, max_rounds=5, max_tokens=5) == []


def test_empty_interrupted_replies_are_not_sent_upstream() -> None:
    rounds = [StoredRound(1, 8, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])]
    assert history_messages(rounds) == [{"role": "user", "content": "hi"}]


def test_chunks_are_valid_openai_json() -> None:
    writer = ChunkWriter("chatcmpl-x", "model-\"quoted\"")
    for encoded in (writer.role(), writer.content('he said "你好"\n'), writer.finish("stop"), writer.usage({"prompt_tokens": 1})):
        chunk = json.loads(encoded)
        assert chunk["id"] == "chatcmpl-x" and chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == 'model-"quoted"'
    assert json.loads(writer.content('he said "你好"\n'))["choices"][0]["delta"]["content"] == 'he said "你好"\n'
    assert json.loads(writer.usage({"prompt_tokens": 1}))["choices"] == []


def test_text_chunks_of_one_read_are_merged_and_others_kept() -> None:
    from llm_proxy.upstream import coalesce

    def chunk(delta: dict, finish: str | None = None, **extra: object) -> dict:
        return {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

    role = chunk({"role": "assistant", "content": "", "refusal": None})
    call = chunk({"tool_calls": [{"index": 0, "id": "x", "function": {"name": "f", "arguments": ""}}]})
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 1}}
    merged = coalesce([role, chunk({"content": "a"}), chunk({"content": " b"}), chunk({}, "stop"), chunk({"content": "d"})])
    assert merged == [chunk({"role": "assistant", "content": "a b", "refusal": None}, "stop"), chunk({"content": "d"})]
    kept = [chunk({"content": "a"}), call, chunk({"content": "b"}), usage, chunk({"content": "c"}, logprobs=None)]
    assert coalesce([dict(c) for c in kept]) == kept


def test_stored_history_goes_into_the_request_as_chatopenai_would_send_its_messages() -> None:
    from langchain_openai import ChatOpenAI

    from llm_proxy.context import StoredRound, as_langchain, history_messages, upstream_messages
    from llm_proxy.upstream import _ChatOpenAI

    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{bad json"}}]
    rounds = [
        StoredRound(1, 5, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
        StoredRound(2, 5, [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "assistant", "content": "It is 42."},
        ]),
        StoredRound(3, 5, [{"role": "user", "content": "again"}, {"role": "assistant", "content": ""}]),  # cut off silent
    ]
    system, new = [{"role": "system", "content": "be brief"}], [{"role": "user", "content": "你好"}]
    plain = ChatOpenAI(model="m", api_key="k")
    ours = _ChatOpenAI(model="m", api_key="k")
    expected = plain._get_request_payload(as_langchain([*system, *history_messages(rounds), *new]), stream=True)
    for _ in range(2):  # the second time from each round's stored form
        assert ours._get_request_payload(upstream_messages(system, rounds, new), stream=True) == expected
    assert all(r.request_form is not None for r in rounds)
    assert expected["messages"][4]["tool_calls"] == calls  # the model's arguments, as it wrote them
    assert ours._get_request_payload(upstream_messages(system, [], new)) == plain._get_request_payload(as_langchain([*system, *new]))


def test_request_body_encoding_keeps_what_orjson_refuses() -> None:
    from llm_proxy.upstream import _encode

    body = {"messages": [{"role": "user", "content": "你好 \u2028"}], "seed": 2**70, "temperature": 0.5}
    assert json.loads(_encode(body)) == body
    assert json.loads(_encode({"messages": [], "top_p": 1})) == {"messages": [], "top_p": 1}
