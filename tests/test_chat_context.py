"""Context management through real HTTP: rounds, history, retries, atomicity (rules 1-4, 7, 8)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from sqlalchemy import select

from llm_proxy.models import Round
from tests.support import Proxy, Upstream, first_text, headers, marker, run_db, wait_until

SYSTEM = {"role": "system", "content": "You are a helpful voice assistant."}


def ask(client: openai.OpenAI, task_id: str | None, text: str, *, stream: bool, request_id: str | None = None,
        messages: list[dict] | None = None, **extra: object) -> str:
    """One orchestrator round: system prompt + the new user message; returns the reply text."""
    body = messages if messages is not None else [SYSTEM, {"role": "user", "content": text}]
    if stream:
        chunks = client.chat.completions.create(
            model="m", messages=body, stream=True, extra_headers=headers(task_id, request_id), **extra
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(model="m", messages=body, extra_headers=headers(task_id, request_id), **extra)
    return reply.choices[0].message.content


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_history_is_stored_and_sent_before_the_new_turn(
    proxy: Proxy, client: openai.OpenAI, upstream: Upstream, task_id: str, stream: bool
) -> None:
    tag = marker()
    replies = [ask(client, task_id, f"{tag} round {i}", stream=stream) for i in range(3)]
    assert replies == [f"You said: {tag} round {i}" for i in range(3)]

    sent = upstream.requests(f"{tag} round 2")[0]["messages"]
    assert sent == [
        SYSTEM,
        {"role": "user", "content": f"{tag} round 0"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": f"{tag} round 1"},
        {"role": "assistant", "content": replies[1]},
        {"role": "user", "content": f"{tag} round 2"},
    ]
    rounds = proxy.rounds(task_id)
    assert [r["seq"] for r in rounds] == [1, 2, 3]
    assert all(r["status"] == "completed" and not r["interrupted"] for r in rounds)
    assert rounds[1]["messages"] == [
        {"role": "user", "content": f"{tag} round 1"},
        {"role": "assistant", "content": replies[1]},
    ]


def test_history_the_orchestrator_sends_itself_is_not_sent_twice(
    client: openai.OpenAI, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    first = ask(client, task_id, f"{tag} one", stream=True)
    # `History: 5` on the orchestrator: it sends its own copy of the conversation as well.
    second_body = [
        SYSTEM,
        {"role": "user", "content": f"{tag} one"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": f"{tag} two"},
        {"role": "user", "content": f"{tag} two, continued"},
    ]
    ask(client, task_id, "", stream=True, messages=second_body)
    sent = upstream.requests(f"{tag} two, continued")[0]["messages"]
    assert sent == [
        SYSTEM,
        {"role": "user", "content": f"{tag} one"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": f"{tag} two"},
        {"role": "user", "content": f"{tag} two, continued"},
    ]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
@pytest.mark.parametrize("spelling", ["X-Request-Id", "X-Rquest-Id"])
def test_retry_of_a_completed_round_replays_without_upstream(
    proxy: Proxy, client: openai.OpenAI, upstream: Upstream, task_id: str, stream: bool, spelling: str
) -> None:
    tag = marker()
    request_id = f"req-{tag}"
    retry_headers = {"X-Task-Id": task_id, spelling: request_id}
    body = [SYSTEM, {"role": "user", "content": f"{tag} hello"}]
    first = client.chat.completions.create(model="m", messages=body, extra_headers=retry_headers)
    if stream:
        chunks = list(client.chat.completions.create(model="m", messages=body, stream=True, extra_headers=retry_headers))
        again = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].id == first.id
    else:
        retry = client.chat.completions.create(model="m", messages=body, extra_headers=retry_headers)
        again = retry.choices[0].message.content
        assert retry.id == first.id
    assert again == first.choices[0].message.content == f"You said: {tag} hello"
    assert len(upstream.requests(tag)) == 1
    assert len(proxy.rounds(task_id)) == 1


def test_retry_of_an_interrupted_round_answers_it_again_in_place(
    proxy: Proxy, client: openai.OpenAI, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    ask(client, task_id, f"{tag} before", stream=False)
    # The first attempt is cut off after a few words (the orchestrator's timeout fired).
    # The retry brings the same words; the fake upstream's behaviour is steered by the model name.
    stream = client.chat.completions.create(
        model="m[[words:400]] [[delay:0.01]]", stream=True, extra_headers=headers(task_id, f"req-{tag}"),
        messages=[SYSTEM, {"role": "user", "content": f"{tag} again"}],
    )
    first_text(stream)
    stream.close()
    wait_until(lambda: len(proxy.rounds(task_id)) == 2 and proxy.rounds(task_id)[1]["interrupted"], what="interrupted round")
    retry = client.chat.completions.create(
        model="m[[words:5]]", extra_headers=headers(task_id, f"req-{tag}"),
        messages=[SYSTEM, {"role": "user", "content": f"{tag} again"}],
    )
    assert retry.choices[0].message.content == "w0 w1 w2 w3 w4"
    rounds = proxy.rounds(task_id)
    assert [r["seq"] for r in rounds] == [1, 2]
    assert rounds[1]["status"] == "completed" and not rounds[1]["interrupted"]
    assert rounds[1]["messages"][-1] == {"role": "assistant", "content": "w0 w1 w2 w3 w4"}
    # The retry's context is the round before it, not the interrupted attempt.
    assert upstream.requests(f"{tag} again")[-1]["messages"][1:3] == [
        {"role": "user", "content": f"{tag} before"},
        {"role": "assistant", "content": f"You said: {tag} before"},
    ]


@pytest.mark.parametrize(
    ("directive", "status", "error_class", "code"),
    [
        ("[[status:500]]", 502, openai.InternalServerError, "upstream_failed"),
        ("[[status:429]]", 429, openai.RateLimitError, "upstream_rate_limited"),
        ("[[status:400]]", 502, openai.InternalServerError, "upstream_refused"),
    ],
)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_upstream_failure_before_first_token_stores_nothing(
    proxy: Proxy, client: openai.OpenAI, upstream: Upstream, task_id: str,
    directive: str, status: int, error_class: type, code: str, stream: bool,
) -> None:
    tag = marker()
    ask(client, task_id, f"{tag} fine", stream=stream)
    with pytest.raises(error_class) as caught:
        ask(client, task_id, f"{tag} {directive}", stream=stream)
    assert caught.value.status_code == status
    assert caught.value.body["code"] == code
    assert "Upstream" in caught.value.body["message"]
    rounds = proxy.rounds(task_id)
    assert len(rounds) == 1
    ask(client, task_id, f"{tag} after", stream=stream)
    sent = upstream.requests(f"{tag} after")[0]["messages"]
    assert directive not in json.dumps(sent)
    assert [r["seq"] for r in proxy.rounds(task_id)] == [1, 3]


def test_upstream_error_mid_stream_ends_with_an_error_event(
    proxy: Proxy, client: openai.OpenAI, task_id: str
) -> None:
    tag = marker()
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(
            model="m", stream=True, extra_headers=headers(task_id),
            messages=[SYSTEM, {"role": "user", "content": f"{tag} [[words:10]] [[fail_after:3]]"}],
        ):
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    assert "Upstream failed" in caught.value.message
    assert "".join(received) == "w0 w1 w2"
    [stored] = proxy.rounds(task_id)
    assert stored["interrupted"] and stored["messages"][-1] == {"role": "assistant", "content": "w0 w1 w2"}


def test_upstream_error_mid_answer_fails_a_plain_request_and_stores_nothing(
    proxy: Proxy, client: openai.OpenAI, task_id: str
) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        ask(client, task_id, f"{marker()} [[words:10]] [[fail_after:3]]", stream=False)
    assert caught.value.status_code == 502
    assert proxy.rounds(task_id) == []


def test_stateless_without_task_id(proxy: Proxy, client: openai.OpenAI, upstream: Upstream) -> None:
    tag = marker()
    body = [
        SYSTEM,
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "earlier reply"},
        {"role": "user", "content": f"{tag} now"},
    ]
    assert ask(client, None, "", stream=True, messages=body) == f"You said: {tag} now"
    assert upstream.requests(tag)[0]["messages"] == body


def test_openai_parameters_pass_through_other_fields_are_kept_and_trtc_headers_are_stored(
    proxy: Proxy, client: openai.OpenAI, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    meta_info = {"custom_key": "value", "nested": {"a": [1, 2, {"b": None}]}}
    client.chat.completions.create(
        model="gpt-x",
        messages=[SYSTEM, {"role": "user", "content": tag}],
        stream=True,
        temperature=0.25,
        top_p=0.5,
        max_tokens=77,
        extra_body=meta_info,
        extra_headers=headers(
            task_id, **{"X-Sdk-App-Id": "1400000001", "X-User-Id": "bot_1", "X-Room-Id": "room-9", "X-Room-Id-Type": "1"}
        ),
    ).close()
    body = upstream.requests(tag)[0]
    assert body["model"] == "gpt-x"
    assert body["temperature"] == 0.25 and body["top_p"] == 0.5 and body["max_tokens"] == 77
    # The other fields (MetaInfo's) are kept with the round, and go upstream only where asked
    # (`forward_extra_fields`, tests/test_profiles.py).
    assert "custom_key" not in body and "nested" not in body
    [stored] = wait_until(lambda: run_db(proxy.database_url, lambda conn: conn.execute(
        select(Round.extra_fields).where(Round.task_id == task_id, Round.status != "pending")).scalars().all()),
        timeout=10, what="the round stored")
    if stored != meta_info:
        rows = run_db(proxy.database_url, lambda conn: [dict(r) for r in conn.execute(select(Round.__table__).where(Round.task_id == task_id)).mappings()])
        raise AssertionError(repr(rows) + proxy.logs()[-3000:])
    row = proxy.task_row(task_id)
    assert row is not None
    assert (row["sdk_app_id"], row["user_id"], row["room_id"], row["room_id_type"]) == ("1400000001", "bot_1", "room-9", "1")


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_options_include_usage(http: httpx.Client, task_id: str, include_usage: bool) -> None:
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": marker()}],
        "stream_options": {"include_usage": include_usage},
    }
    sent = headers(task_id)
    response = http.post("/v1/chat/completions", json=body, headers=sent)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    # One `data:` line per event, events apart by a blank line, whether or not they were written
    # together; the retry replays the same events.
    raw = response.text
    replayed = http.post("/v1/chat/completions", json=body, headers=sent).text
    assert raw.endswith("data: [DONE]\n\n")
    events = [block.removeprefix("data: ") for block in raw.split("\n\n")[:-1]]
    assert all("\n" not in e for e in events)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    said = f"You said: {body['messages'][0]['content']}"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == said
    assert replayed.endswith("data: [DONE]\n\n")
    replay = [json.loads(block.removeprefix("data: ")) for block in replayed.split("\n\n")[:-2]]
    assert [c["choices"][0]["delta"] for c in replay[:2]] == [{"role": "assistant", "content": ""}, {"content": said}]
    assert replay[2]["choices"][0]["finish_reason"] == "stop"
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finish] == ["stop"]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    if include_usage:
        assert usage == [{"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}]
        assert chunks[-1]["choices"] == []
    else:
        assert usage == []


@pytest.mark.parametrize(
    ("max_rounds", "max_tokens", "kept"),
    [("3", "40", [3, 4]), ("1", "100000", [4]), ("0", "100000", [])],
    ids=["token-limit", "round-limit", "no-history"],
)
def test_history_window_keeps_whole_newest_rounds(
    start_proxy, upstream: Upstream, migrated_url: str, max_rounds: str, max_tokens: str, kept: list[int]
) -> None:
    # Each round here is estimated at 18 tokens (user 8, assistant 10).
    server = start_proxy(
        {"DATABASE_URL": migrated_url, "HISTORY_MAX_ROUNDS": max_rounds, "HISTORY_MAX_TOKENS": max_tokens}, in_process=True
    )
    client = server.client()
    tag = marker()
    task_id = f"task-{tag}"
    for n in range(6):
        ask(client, task_id, f"{tag} {n}", stream=False)
    sent = upstream.requests(f"{tag} 5")[0]["messages"]
    expected = [SYSTEM]
    for n in kept:
        expected += [{"role": "user", "content": f"{tag} {n}"}, {"role": "assistant", "content": f"You said: {tag} {n}"}]
    assert sent == expected + [{"role": "user", "content": f"{tag} 5"}]


WELCOME = "Hi, I'm Lily. How can I help?"


def test_the_welcome_line_opens_every_new_tasks_context_as_round_0(
    start_proxy, upstream: Upstream, migrated_url: str
) -> None:
    from orchestrator.protocol import sign
    from tests.conftest import ADMIN_KEY, CALLBACK_KEY

    server = start_proxy(
        {"DATABASE_URL": migrated_url, "WELCOME_MESSAGE": WELCOME, "ADMIN_API_KEYS": ADMIN_KEY,
         "CALLBACK_SIGN_KEY": CALLBACK_KEY},
        in_process=True,
    )
    client = server.client()
    tag = marker()
    task_id = f"task-{tag}"
    welcome = {"role": "assistant", "content": WELCOME}
    for n in range(2):
        client.chat.completions.create(model="m", messages=[SYSTEM, {"role": "user", "content": f"{tag} {n}"}], extra_headers=headers(task_id))
    assert upstream.requests(f"{tag} 0")[0]["messages"] == [SYSTEM, welcome, {"role": "user", "content": f"{tag} 0"}]
    assert upstream.requests(f"{tag} 1")[0]["messages"][:3] == [SYSTEM, welcome, {"role": "user", "content": f"{tag} 0"}]
    rounds = server.rounds(task_id)
    assert [(r["seq"], r["messages"][0]) for r in rounds][:2] == [(0, welcome), (1, {"role": "user", "content": f"{tag} 0"})]
    # The orchestrator's 903 of the bot's welcome names round 0.
    event = {"EventGroupId": 9, "EventType": 903, "CallbackTs": 1, "EventInfo": {
        "EventMsTs": 1, "TaskId": task_id, "Payload": {"UserId": "bot", "Text": WELCOME, "RoundId": f"r0-{tag}"}}}
    raw = json.dumps(event).encode()
    assert httpx.post(server.url + "/api/v1/trtc/callback", content=raw, headers={"Sign": sign(CALLBACK_KEY, raw)}).json() == {"code": 0}
    detail = httpx.get(server.url + f"/admin/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    zero = detail["rounds"][0]
    assert (zero["seq"], zero["finish_reason"], zero["trtc_round_id"], zero["messages"]) == (0, "welcome", f"r0-{tag}", [welcome])
    # Counted as no exchange: the task list and the stats count the two rounds the user had.
    listed = httpx.get(server.url + "/admin/v1/tasks", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert [t["rounds"] for t in listed["data"] if t["task_id"] == task_id] == [2]
    # Another task opens with it too; a task of a server without one does not.
    other = f"task-{tag}-b"
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"{tag} b"}], extra_headers=headers(other))
    assert upstream.requests(f"{tag} b")[0]["messages"][0] == welcome
