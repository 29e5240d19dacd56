"""Each input that once made a 5xx (or a reset), now a clear 4xx in the route's own error shape,
on both databases: deep JSON, lone surrogates, times the admin API could not compare or convert,
callback fields no column holds. `test_fuzz.py` hunts for more of the same at random."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import quote

import httpx
import pytest

from orchestrator.protocol import sign
from tests.conftest import ADMIN_KEY, CALLBACK_KEY, TTS_KEY
from tests.support import API_KEY, Proxy, headers, marker

DEEP = b"[" * 1000 + b"]" * 1000
SURROGATE_CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
SURROGATE_EXTRA = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "\\udc00"}'


def _chat(proxy: Proxy, raw: bytes) -> httpx.Response:
    return httpx.post(proxy.url + "/v1/chat/completions", content=raw, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}", **headers(f"task-{marker()}")})


@pytest.mark.parametrize("raw", [DEEP, b'{"model": "m", "messages": ' + DEEP + b"}", SURROGATE_CHAT, SURROGATE_EXTRA])
def test_chat_refuses_deep_json_and_lone_surrogates(proxy: Proxy, raw: bytes) -> None:
    response = _chat(proxy, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [DEEP, b'{"Text": "hi", "X": ' + DEEP + b"}", b'{"Text": "hi \\ud800 there"}'])
def test_tts_refuses_deep_json_and_lone_surrogates(tts: Proxy, raw: bytes) -> None:
    response = httpx.post(tts.url + "/api/v1/tts/stream", content=raw, headers={"Authorization": f"Bearer {TTS_KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_JSON" and "Error" not in error["message"]


def _event(event_type: object, task_id: object, payload: dict) -> bytes:
    return json.dumps({"EventGroupId": 9, "EventType": event_type, "CallbackTs": int(time.time() * 1000),
                       "EventInfo": {"EventMsTs": int(time.time() * 1000), "TaskId": task_id, "RoomId": "r",
                                     "RoomIdType": 1, "Payload": payload}}).encode()


def _callback(proxy: Proxy, raw: bytes) -> httpx.Response:
    return httpx.post(proxy.url + "/api/v1/trtc/callback", content=raw, headers={"Sign": sign(CALLBACK_KEY, raw)})


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (DEEP, None),
        (_event(905, "t\ud800", {"Text": "hi"}).replace(b"\\\\", b"\\"), None),
        (_event(10**30, "task-1", {}), "EventType"),
        (_event(-1, "task-1", {}), "EventType"),
        (_event(906, "t" * 257, {}), "TaskId"),
        (_event(906, "a\x00b", {}), "TaskId"),
        (_event(906, "task-1", {"RoundId": "r" * 300}), "RoundId"),
    ],
)
def test_callback_fields_no_column_holds_are_a_400_before_any_write(proxy: Proxy, raw: bytes, field: str | None) -> None:
    response = _callback(proxy, raw)
    assert response.status_code == 400, response.text
    if field:
        assert field in response.json()["error"]["message"]


def test_callback_with_odd_but_storable_fields_is_taken(proxy: Proxy) -> None:
    for payload in ({"Tag": "not an object", "Metric": "llm_first_token", "Value": "fast"},
                    {"Tag": {"RoundId": 7, "Code": ["x"]}, "Metric": "x" * 500}, {"Text": "a\x00b", "RoundId": None}):
        for event_type in (905, 906, 908):
            response = _callback(proxy, _event(event_type, f"task-{marker()}", payload))
            assert response.status_code == 200 and response.json() == {"code": 0}


def _admin(proxy: Proxy, path: str, method: str = "GET", **params: str) -> httpx.Response:
    return httpx.request(method, proxy.url + path, params=params, headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def test_admin_times_are_parsed_strictly(proxy: Proxy) -> None:
    assert _admin(proxy, "/admin/v1/tasks", since="2026-12-01").status_code == 200  # no offset: UTC
    assert _admin(proxy, "/admin/v1/stats", since="2026-11-30T00:00:00", until="2026-12-01").status_code == 200
    for value in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "yesterday", "2026-13-01"):
        for path in ("/admin/v1/tasks", "/admin/v1/stats"):
            response = _admin(proxy, path, since=value)
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_time", (path, value)


def test_admin_identifiers_no_task_can_have(proxy: Proxy) -> None:
    for ident in ("a\x00b", "t" * 300):
        assert _admin(proxy, f"/admin/v1/tasks/{quote(ident)}").status_code == 404
        assert _admin(proxy, f"/admin/v1/tasks/{quote(ident)}", "DELETE").status_code == 404
        assert _admin(proxy, f"/admin/v1/users/1400/{quote(ident)}", "DELETE").json() == {"deleted": {"tasks": [], "memories": 0}}
        assert _admin(proxy, f"/admin/v1/users/{quote(ident)}/{quote(ident)}/memory").json()["data"] == []
        assert _admin(proxy, "/admin/v1/tasks", user_id=ident).status_code == 400
    cursor = "W1siMjAyNi0xMi0wMSIsICJ0XHUwMDAweCJdXQ=="  # a made-up cursor
    assert _admin(proxy, "/admin/v1/tasks", cursor=cursor).status_code == 400


def test_a_request_uvicorn_cannot_parse_gets_its_400_not_a_reset(proxy: Proxy) -> None:
    """A control character in a header, then a megabyte more of request: the 400 arrives whole
    (a lingering close, `app/http_protocol.py`), where closing at once made the kernel reset the
    connection under the unread bytes."""
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Task-Id: a\x1cb\r\n"
               + b"X-Pad: " + b"x" * 1_000_000 + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 "), received[:200]
