"""Client input never produces a 5xx, and both databases answer it alike: identifiers up to 256
characters are stored and longer ones refused with a 400 naming the header; NUL characters are
stored without the NUL; messages without content are refused before anything is stored; bodies
over MAX_REQUEST_BYTES get 413; a retried round takes no new sequence number."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TTS_KEY
from tests.support import API_KEY, Proxy, headers, marker

CHAT = "/v1/chat/completions"


def _post(proxy: Proxy, body: Any, task_id: str | None, **extra_headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        proxy.url + CHAT,
        content=content,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers(task_id), **extra_headers},
        timeout=30,
    )


def _body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


@pytest.mark.parametrize(
    "header", ["X-Request-Id", "X-Sdk-App-Id", "X-User-Id", "X-Room-Id", "X-Room-Id-Type"]
)
def test_identifiers_up_to_256_characters_are_stored(proxy: Proxy, task_id: str, header: str) -> None:
    value = "v" * 256
    response = _post(proxy, _body(marker()), task_id, **{header: value})
    assert response.status_code == 200, response.text
    [stored] = proxy.rounds(task_id)
    task = proxy.task_row(task_id)
    assert task is not None
    assert value in (stored["request_id"], task["sdk_app_id"], task["user_id"], task["room_id"], task["room_id_type"])


def test_a_task_id_of_256_characters_and_a_room_type_word_are_stored(proxy: Proxy) -> None:
    task_id = "t" * 250 + marker()[:6]
    response = _post(proxy, _body(marker()), task_id, **{"X-Room-Id-Type": "stringtype"})
    assert response.status_code == 200, response.text
    assert proxy.task_row(task_id)["room_id_type"] == "stringtype"


@pytest.mark.parametrize(
    ("header", "length"),
    [("X-Task-Id", 257), ("X-Task-Id", 10_000), ("X-Request-Id", 300), ("X-Sdk-App-Id", 1000), ("X-User-Id", 257)],
)
def test_longer_identifiers_are_refused_naming_the_header(proxy: Proxy, task_id: str, header: str, length: int) -> None:
    response = _post(proxy, _body(marker()), task_id, **{header: "x" * length})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "header_too_long" and header in error["message"] and "256" in error["message"]
    if header != "X-Task-Id":
        assert proxy.task_row(task_id) is None


def test_more_than_a_thousand_messages_are_refused_before_anything_is_stored(proxy: Proxy, task_id: str) -> None:
    many = {"model": "m", "messages": [{"role": "user", "content": ""}] * 1000 + [{"role": "user", "content": "hi"}]}
    response = _post(proxy, many, task_id)
    assert response.status_code == 422 and "messages" in response.json()["error"]["message"]
    assert proxy.task_row(task_id) is None


def test_a_long_model_name_is_kept_and_a_longer_one_refused(proxy: Proxy, task_id: str) -> None:
    assert _post(proxy, {**_body(marker()), "model": "m" * 200}, task_id).status_code == 200
    response = _post(proxy, {**_body(marker()), "model": "m" * 257}, task_id)
    assert response.status_code == 422 and "model" in response.json()["error"]["message"]


def test_nul_characters_are_stored_without_the_nul(proxy: Proxy, upstream, task_id: str) -> None:
    tag = marker()
    response = _post(proxy, _body(f"{tag} a\u0000b"), task_id)
    assert response.status_code == 200, response.text
    [stored] = proxy.rounds(task_id)
    assert stored["messages"][0] == {"role": "user", "content": f"{tag} ab"}


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": None},
        {"role": "user"},
        {"role": "system"},
        {"role": "tool", "content": "result"},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": "x", "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "assistant", "content": "x", "tool_calls": ["not a call"]},
    ],
    ids=["user-null", "user-missing", "system-missing", "tool-without-call-id", "assistant-null", "call-no-function", "call-not-object"],
)
def test_messages_without_what_they_need_are_422_and_store_nothing(proxy: Proxy, task_id: str, message: dict) -> None:
    body = {"model": "m", "messages": [message, {"role": "user", "content": "hello"}]}
    response = _post(proxy, body, task_id)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_body"
    assert proxy.task_row(task_id) is None
    assert "Traceback" not in proxy.logs()


def test_an_assistant_message_with_tool_calls_needs_no_content(proxy: Proxy, task_id: str) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            {"role": "assistant", "content": "done"},
            {"role": "user", "content": marker()},
        ],
    }
    assert _post(proxy, body, task_id).status_code == 200


def test_a_retried_round_takes_no_sequence_number_and_reports_its_usage(proxy: Proxy, task_id: str) -> None:
    body = _body(marker())
    first = _post(proxy, body, task_id, **{"X-Request-Id": "req-1"})
    assert proxy.task_row(task_id)["last_seq"] == 1
    for stream in (False, True):
        retried = _post(proxy, {**body, "stream": stream, "stream_options": {"include_usage": True}}, task_id,
                        **{"X-Request-Id": "req-1"})
        assert retried.status_code == 200
        assert proxy.task_row(task_id)["last_seq"] == 1
        if stream:
            events = [json.loads(line[6:]) for line in retried.text.splitlines() if line.startswith("data: {")]
            usage = [e["usage"] for e in events if e.get("usage")]
            assert usage == [first.json()["usage"]]
        else:
            assert retried.json()["usage"] == first.json()["usage"] != {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    _post(proxy, _body(marker()), task_id)
    assert [r["seq"] for r in proxy.rounds(task_id)] == [1, 2]


def test_a_body_over_the_limit_is_413_before_it_is_read(start_proxy, task_id: str) -> None:
    server = start_proxy({"MAX_REQUEST_BYTES": "100000", "TTS_API_KEYS": TTS_KEY}, args=())
    big = _body("x" * 200_000)
    response = _post(server, big, task_id)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large" and "100000" in response.json()["error"]["message"]

    def chunked() -> Any:  # no Content-Length: the limit is met while reading
        data = json.dumps(big).encode()
        for start in range(0, len(data), 16384):
            yield data[start : start + 16384]

    response = httpx.post(
        server.url + CHAT, content=chunked(), timeout=30,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers(task_id)},
    )
    assert response.status_code == 413
    assert server.task_row(task_id) is None
    assert _post(server, _body("small"), task_id).status_code == 200

    tts = httpx.post(
        server.url + "/api/v1/tts/stream", json={"Text": "x" * 200_000}, timeout=30,
        headers={"Authorization": f"Bearer {TTS_KEY}"},
    )
    assert tts.status_code == 413 and tts.json()["error"]["code"] == "REQUEST_TOO_LARGE"


def test_an_unreachable_upstream_is_named_without_internals(start_proxy, task_id: str) -> None:
    from tests.support import free_port

    server = start_proxy({"UPSTREAM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"})
    with pytest.raises(openai.InternalServerError) as caught:
        server.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers=headers(task_id)
        )
    assert caught.value.body["message"] == "Upstream unreachable."
    assert "ClientConnectorError" in server.logs()
