"""Function calling through real HTTP: the fake upstream streams tool calls in fragments, the
proxy runs server tools (Python and HTTP ones) or hands client tools back, and every round is
stored message by message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import openai
import pytest

from llm_proxy.context import INTERRUPTED_RESULT
from tests.support import ROOT, Proxy, Upstream, first_text, headers, marker, wait_until

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tool_proxy(migrated_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("tools")
    (workdir / "gates").mkdir()
    (workdir / "counts").mkdir()
    tools_file = workdir / "tools.json"
    tools_file.write_text(json.dumps({"tools": [
        {"name": "lookup_order", "description": "Order status by id.", "method": "GET",
         "url": upstream.url + "/_echo", "headers": {"Authorization": "Bearer ${ORDER_TOKEN}"},
         "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}},
        {"name": "create_ticket", "description": "Open a support ticket.", "method": "POST",
         "url": upstream.url + "/_echo", "timeout_s": 2,
         "parameters": {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}},
        {"name": "broken_service", "description": "Always answers 500.", "url": upstream.url + "/_fail"},
    ]}))
    server = Proxy(workdir, {
        "DATABASE_URL": migrated_url,
        "UPSTREAM_BASE_URL": upstream.base_url,
        "PYTHONPATH": str(ROOT),
        "BUILTIN_TOOLS": "true",
        "TOOLS_MODULES": "tests.tool_fixtures",
        "TOOLS_FILE": str(tools_file),
        "ORDER_TOKEN": "order-secret",
        "TOOL_TIMEOUT_S": "3",
        "TOOL_MAX_STEPS": "3",
        "GATE_DIR": str(workdir / "gates"),
        "COUNT_DIR": str(workdir / "counts"),
    })
    server.start("--only", "llm")
    yield server
    server.stop()


@pytest.fixture
def tc(tool_proxy: Proxy) -> openai.OpenAI:
    return tool_proxy.client()


def _ask(client: openai.OpenAI, task_id: str, text: str, **kwargs) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], extra_headers=headers(task_id), **kwargs
    )


def _stored(proxy: Proxy, task_id: str) -> list[list[dict]]:
    return [r["messages"] for r in proxy.rounds(task_id)]


def test_server_tool_loop_streams_the_filler_first_and_stores_every_message(
    tool_proxy: Proxy, tc: openai.OpenAI, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    gate = tool_proxy.workdir / "gates" / tag
    text = f'{tag} [[say:Let me check that.]] [[tool:gate:{{"name": "{tag}"}}]]'
    stream = tc.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": text}], extra_headers=headers(task_id)
    )
    received = ""
    for chunk in stream:
        received += chunk.choices[0].delta.content or "" if chunk.choices else ""
        if received == "Let me check that.":
            # The tool only finishes once the filler has reached us.
            gate.touch()
    assert received == f"Let me check that.Results: opened {tag}"

    (round_,) = _stored(tool_proxy, task_id)
    call = round_[1]["tool_calls"][0]
    assert round_ == [
        {"role": "user", "content": text},
        {"role": "assistant", "content": "Let me check that.", "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": "gate", "arguments": f'{{"name": "{tag}"}}'}}]},
        {"role": "tool", "content": f"opened {tag}", "tool_call_id": call["id"]},
        {"role": "assistant", "content": f"Results: opened {tag}"},
    ]
    first, second = upstream.requests(tag)
    assert {t["function"]["name"] for t in first["tools"]} >= {"current_time", "faq_lookup", "echo", "lookup_order"}
    assert second["messages"][-2:] == round_[1:3]


def test_several_calls_of_one_turn_run_concurrently(tool_proxy: Proxy, tc: openai.OpenAI, task_id: str) -> None:
    # Each `meet` call returns only once the other has started: run one after the other, both
    # would time out.
    reply = _ask(tc, task_id, '[[tool:meet:{"name": "a"}]] [[tool:meet:{"name": "b"}]]')
    assert reply.choices[0].message.content == "Results: met a | met b"
    (round_,) = _stored(tool_proxy, task_id)
    assert [m["role"] for m in round_] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [m["tool_call_id"] for m in round_[2:4]] == [c["id"] for c in round_[1]["tool_calls"]]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("[[tool:boom:{}]]", "The tool failed: RuntimeError: the tool broke"),
        ("[[tool:sleepy:{}]]", "The tool did not answer within 3 s."),
        ("[[tool:echo:{not json}]]", "The arguments are not valid JSON"),
        ('[[tool:echo:{"text": 5}]]', "The arguments do not match the schema: 5 is not of type 'string'."),
        ("[[tool:no_such_tool:{}]]", "There is no tool named 'no_such_tool'."),
        ('[[tool:broken_service:{}]]', "The tool failed: RuntimeError: HTTP 500"),
    ],
    ids=["raises", "times-out", "bad-json", "bad-schema", "unknown", "http-500"],
)
def test_a_failing_call_gives_the_model_an_error_not_the_client_a_500(
    tool_proxy: Proxy, tc: openai.OpenAI, task_id: str, call: str, error: str
) -> None:
    reply = _ask(tc, task_id, call)
    assert reply.choices[0].finish_reason == "stop"
    (round_,) = _stored(tool_proxy, task_id)
    result = json.loads(round_[2]["content"])
    assert set(result) == {"error"} and result["error"].startswith(error)
    assert reply.choices[0].message.content == "Results: " + round_[2]["content"]


def test_the_step_limit_ends_with_a_text_answer(tool_proxy: Proxy, tc: openai.OpenAI, upstream: Upstream, task_id: str) -> None:
    tag = marker()
    reply = _ask(tc, task_id, f'[[tool_loop:1]] [[tool:echo:{{"text": "{tag}"}}]]')
    calls = upstream.requests(tag)
    assert len(calls) == 4  # three tool steps (TOOL_MAX_STEPS), then one with tools off
    assert [c.get("tool_choice") for c in calls] == [None, None, None, "none"]
    assert reply.choices[0].message.content == f"Results: {tag} | {tag} | {tag}"
    (round_,) = _stored(tool_proxy, task_id)
    assert [m["role"] for m in round_] == ["user", *["assistant", "tool"] * 3, "assistant"]


def test_an_upstream_that_ignores_tool_choice_none_is_cut_off_at_the_step_limit(
    tool_proxy: Proxy, tc: openai.OpenAI, upstream: Upstream, task_id: str
) -> None:
    """Some model servers call tools whatever `tool_choice` says: the round still makes at most
    TOOL_MAX_STEPS tool exchanges and TOOL_MAX_STEPS + 1 upstream calls, ends with what was said,
    and is stored once."""
    tag = marker()
    stream = tc.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f'[[ignore_tool_choice:1]] [[tool_loop:1]] [[say:Checking.]] '
                                                            f'[[tool:echo:{{"text": "{tag}"}}]]'}],
        extra_headers=headers(task_id), stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Checking." * 4 and chunks[-1].choices[0].finish_reason == "stop"
    assert len(upstream.requests(tag)) == 4
    (round_,) = _stored(tool_proxy, task_id)
    assert [m["role"] for m in round_] == ["user", *["assistant", "tool"] * 3, "assistant"]
    assert round_[-1]["content"] == "Checking." and "tool_calls" not in round_[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_that_says_nothing_ends_in_a_clear_error(
    tool_proxy: Proxy, tc: openai.OpenAI, upstream: Upstream, task_id: str, stream: bool
) -> None:
    tag = marker()
    content = f'[[ignore_tool_choice:1]] [[tool_loop:1]] [[tool:echo:{{"text": "{tag}"}}]]'
    with pytest.raises(openai.APIError) as raised:
        reply = tc.chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], extra_headers=headers(task_id), stream=stream,
        )
        if stream:
            list(reply)
    assert "TOOL_MAX_STEPS" in str(raised.value)
    assert len(upstream.requests(tag)) == 4
    stored = _stored(tool_proxy, task_id)
    if stream:  # the stream had begun: stored once, interrupted, with the three exchanges
        (round_,) = stored
        assert [m["role"] for m in round_] == ["user", *["assistant", "tool"] * 3, "assistant"]
    else:  # failed whole: nothing stored, the retry starts clean
        assert stored == []


def test_http_tools_call_a_real_http_server(tool_proxy: Proxy, tc: openai.OpenAI, task_id: str) -> None:
    _ask(tc, task_id, '[[tool:lookup_order:{"order_id": "A-17"}]] [[tool:create_ticket:{"summary": "late parcel"}]]')
    (round_,) = _stored(tool_proxy, task_id)
    got = json.loads(round_[2]["content"])
    posted = json.loads(round_[3]["content"])
    assert got == {"method": "GET", "query": {"order_id": "A-17"}, "json": None, "authorization": "Bearer order-secret"}
    assert posted == {"method": "POST", "query": {}, "json": {"summary": "late parcel"}, "authorization": None}


def test_the_built_in_tools(tool_proxy: Proxy, tc: openai.OpenAI, task_id: str) -> None:
    _ask(tc, task_id, '[[tool:current_time:{"timezone": "Asia/Shanghai"}]] [[tool:faq_lookup:{"question": "How do I return a broken item?"}]]')
    (round_,) = _stored(tool_proxy, task_id)
    now = json.loads(round_[2]["content"])
    assert now["timezone"] == "Asia/Shanghai" and now["datetime"].endswith("+08:00")
    faq = json.loads(round_[3]["content"])
    assert faq["matches"][0]["question"] == "How do I return an item?"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_client_tools_go_back_to_the_client_and_its_results_continue_the_round(
    tool_proxy: Proxy, tc: openai.OpenAI, upstream: Upstream, task_id: str, stream: bool
) -> None:
    tag = marker()
    user = {"role": "user", "content": f'{tag} [[tool:get_weather:{{"city": "Paris"}}]]'}
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in tc.chat.completions.create(model="m", stream=True, messages=[user], tools=[WEATHER], extra_headers=headers(task_id)):
            for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += delta.id or ""
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        (call,) = calls.values()
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        reply = tc.chat.completions.create(model="m", messages=[user], tools=[WEATHER], extra_headers=headers(task_id))
        (tool_call,) = reply.choices[0].message.tool_calls
        finish = reply.choices[0].finish_reason
        call_id, name, arguments = tool_call.id, tool_call.function.name, tool_call.function.arguments
    assert finish == "tool_calls" and name == "get_weather" and json.loads(arguments) == {"city": "Paris"}
    sent_tools = upstream.requests(tag)[0]["tools"]
    assert WEATHER in sent_tools and any(t["function"]["name"] == "current_time" for t in sent_tools)

    assistant = {"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}
    result = {"role": "tool", "tool_call_id": call_id, "content": "18 C and sunny"}
    answer = tc.chat.completions.create(
        model="m", messages=[user, assistant, result], tools=[WEATHER], extra_headers=headers(task_id), stream=False
    )
    assert answer.choices[0].message.content == "Results: 18 C and sunny"
    (round_,) = _stored(tool_proxy, task_id)
    assert round_ == [user, assistant, {**result}, {"role": "assistant", "content": "Results: 18 C and sunny"}]

    _ask(tc, task_id, f"{tag} thanks")
    context = upstream.requests(f"{tag} thanks")[0]["messages"]
    # (ChatOpenAI sends an assistant message's empty text as null when it has tool calls.)
    assert context[-5:] == [user, {**assistant, "content": None}, result, round_[3], {"role": "user", "content": f"{tag} thanks"}]


def test_a_client_tool_wins_a_name_clash_with_a_server_tool(tc: openai.OpenAI, upstream: Upstream, task_id: str) -> None:
    tag = marker()
    mine = {"type": "function", "function": {"name": "current_time", "description": "The client's clock.",
                                             "parameters": {"type": "object", "properties": {}}}}
    reply = tc.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"{tag} [[tool:current_time:{{}}]]"}], tools=[mine],
        extra_headers=headers(task_id),
    )
    assert reply.choices[0].finish_reason == "tool_calls"  # not run by the server
    clocks = [t for t in upstream.requests(tag)[0]["tools"] if t["function"]["name"] == "current_time"]
    assert clocks == [mine]


def test_tool_results_for_no_open_call_are_refused(tc: openai.OpenAI, task_id: str) -> None:
    _ask(tc, task_id, "hello")
    with pytest.raises(openai.BadRequestError) as raised:
        tc.chat.completions.create(
            model="m", extra_headers=headers(task_id),
            messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                      {"role": "tool", "tool_call_id": "call_nope", "content": "x"}],
        )
    assert raised.value.body["code"] == "unknown_tool_call"


def test_interrupted_during_a_tool_call_is_stored_consistently(
    tool_proxy: Proxy, tc: openai.OpenAI, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    text = f'{tag} [[say:One moment.]] [[tool:gate:{{"name": "never-{tag}"}}]]'
    stream = tc.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": text}], extra_headers=headers(task_id)
    )
    first_text(stream)
    wait_until((tool_proxy.workdir / "gates" / f"never-{tag}.running").exists, what="the tool to run")
    stream.close()
    wait_until(lambda: tool_proxy.rounds(task_id), what="the interrupted round")
    (round_,) = tool_proxy.rounds(task_id)
    call_id = round_["messages"][1]["tool_calls"][0]["id"]
    assert round_["interrupted"]
    assert round_["messages"][2:] == [
        {"role": "tool", "content": INTERRUPTED_RESULT, "tool_call_id": call_id},
        {"role": "assistant", "content": ""},
    ]
    _ask(tc, task_id, f"{tag} next")
    context = upstream.requests(f"{tag} next")[0]["messages"]
    assert [m["role"] for m in context[-4:]] == ["user", "assistant", "tool", "user"]
    assert context[-2]["tool_call_id"] == context[-3]["tool_calls"][0]["id"]


def test_retries_do_not_run_tools_again(tool_proxy: Proxy, tc: openai.OpenAI, upstream: Upstream, task_id: str) -> None:
    tag = marker()
    counter = tool_proxy.workdir / "counts" / tag
    text = f'{tag} [[tool:count:{{"key": "{tag}"}}]]'
    request_id = f"req-{tag}"
    first = tc.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], extra_headers=headers(task_id, request_id)
    )
    again = tc.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], extra_headers=headers(task_id, request_id)
    )
    assert again.choices[0].message.content == first.choices[0].message.content == f"Results: counted {tag}"
    assert counter.read_text() == "x"

    # Cut off while the answer after the tool streams; the retry reuses the tool's result.
    slow = f'{tag} [[delay:0.2]] [[tool:count:{{"key": "{tag}-2"}}]]'
    stream = tc.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": slow}], extra_headers=headers(task_id, f"{request_id}-2")
    )
    first_text(stream)
    stream.close()
    wait_until(lambda: len(tool_proxy.rounds(task_id)) == 2, what="the interrupted round")
    retry = tc.chat.completions.create(
        model="m", messages=[{"role": "user", "content": slow}], extra_headers=headers(task_id, f"{request_id}-2")
    )
    assert retry.choices[0].message.content == f"Results: counted {tag}-2"
    assert (tool_proxy.workdir / "counts" / f"{tag}-2").read_text() == "x"
    second = _stored(tool_proxy, task_id)[1]
    assert [m["role"] for m in second] == ["user", "assistant", "tool", "assistant"]
    assert second[-1]["content"] == f"Results: counted {tag}-2"


def test_clashing_tool_names_stop_the_server_at_start(start_proxy) -> None:
    with pytest.raises(AssertionError) as failed:
        start_proxy(
            {"PYTHONPATH": str(ROOT), "BUILTIN_TOOLS": "true", "TOOLS_MODULES": "tests.tool_fixtures_clash"},
        )
    assert "Two tools are named 'current_time'" in str(failed.value)


def test_tools_enabled_narrows_the_tools_sent(start_proxy, upstream: Upstream, task_id: str) -> None:
    server = start_proxy({"BUILTIN_TOOLS": "true", "TOOLS_ENABLED": "current_time"}, in_process=True)
    tag = marker()
    server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": tag}], extra_headers=headers(task_id))
    assert [t["function"]["name"] for t in upstream.requests(tag)[0]["tools"]] == ["current_time"]
    none = start_proxy({"BUILTIN_TOOLS": "true", "TOOLS_ENABLED": ""}, in_process=True)
    tag = marker()
    none.client().chat.completions.create(model="m", messages=[{"role": "user", "content": tag}], extra_headers=headers(task_id))
    assert "tools" not in upstream.requests(tag)[0]


def test_installed_packages_add_tools_through_the_entry_point_group(start_proxy, upstream: Upstream, tmp_path: Path, task_id: str) -> None:
    # A distribution on the path (as pip would install it) whose entry point names a module.
    site = tmp_path / "site"
    (site / "shop_tools").mkdir(parents=True)
    (site / "shop_tools" / "__init__.py").write_text(
        "def shop_hours(day: str) -> str:\n    '''Opening hours on a day.'''\n    return f'{day}: 9 to 5'\n\nTOOLS = [shop_hours]\n"
    )
    dist = site / "shop_tools-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shop-tools\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[trtc_backend.tools]\nshop = shop_tools\n")
    server = start_proxy({"PYTHONPATH": str(site)})
    server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": '[[tool:shop_hours:{"day": "Monday"}]]'}], extra_headers=headers(task_id)
    )
    assert server.rounds(task_id)[0]["messages"][2]["content"] == "Monday: 9 to 5"


def test_no_tools_are_offered_by_default(proxy: Proxy, upstream: Upstream, task_id: str) -> None:
    tag = marker()
    proxy.client().chat.completions.create(model="m", messages=[{"role": "user", "content": tag}], extra_headers=headers(task_id))
    assert "tools" not in upstream.requests(tag)[0]


def test_an_upstream_that_takes_no_tools_is_named_as_the_cause(start_proxy, task_id: str) -> None:
    server = start_proxy({"BUILTIN_TOOLS": "true"})
    with pytest.raises(openai.InternalServerError) as caught:
        server.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "[[no_tools:1]] hi"}], extra_headers=headers(task_id)
        )
    error = caught.value.body
    assert error["code"] == "upstream_rejected_tools"
    assert "does not support tools" in error["message"] and "BUILTIN_TOOLS=false" in error["message"]
    assert "does not support tools" in server.logs()
    assert server.rounds(task_id) == []
