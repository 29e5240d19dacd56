"""Random input through hypothesis, on both databases: random JSON bodies, request-shaped bodies
with random fields, random bytes, random headers (long, non-ASCII, control characters), sent
over a raw socket so that nothing on the client side cleans them up. Never a 5xx, never a
traceback in the log, never a round left pending."""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from llm_proxy.models import ROUND_PENDING, Round
from orchestrator.protocol import sign
from tests.conftest import ADMIN_KEY, CALLBACK_KEY, TTS_KEY
from tests.support import API_KEY, Proxy, run_db

CHAT = b"/v1/chat/completions"
TTS = b"/api/v1/tts/stream"
PREFIX = f"fuzz-{uuid.uuid4().hex[:8]}-"
# FUZZ_EXAMPLES=2000 for a longer hunt than the suite's.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

# Any code point, lone surrogates and NUL included: JSON escapes them (`"\\ud800"`), and neither
# database stores them.
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40) | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# JSON nested deeper than anything recursive code should walk.
deep_json = st.integers(min_value=60, max_value=5000).flatmap(
    lambda depth: st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
                                   b'{"messages": [{"role": "user", "content": "hi", "x": ' + b"[" * depth + b"]" * depth + b"}]}",
                                   b'{"Text": "hi", "Extra": ' + b"[" * depth + b"]" * depth + b"}"])
)
# Header values as bytes: any character but the line breaks that would end the header.
header_values = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=300).map(lambda t: t.encode()),
    st.integers(min_value=200, max_value=12_000).map(lambda n: b"x" * n),
    st.binary(max_size=64).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"])
# Mostly plausible messages (so that bodies get past parsing), some wild ones.
plain_messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "user", "assistant"]), "content": st.none() | st.text(max_size=60) | any_text}
)
wild_messages = st.fixed_dictionaries(
    {"role": roles},
    optional={
        "content": st.none() | st.text(max_size=60) | st.lists(json_values, max_size=2),
        "tool_calls": st.lists(json_values, max_size=2),
        "tool_call_id": st.none() | st.text(max_size=20),
        "name": st.text(max_size=20),
    },
)
messages = plain_messages | plain_messages | wild_messages
chat_bodies = st.fixed_dictionaries(
    {
        "messages": st.lists(messages, min_size=1, max_size=4),
        "model": st.just("m") | st.just("m") | st.none() | st.text(max_size=300) | st.integers(),
    },
    optional={
        "stream": st.booleans() | st.text(max_size=3),
        "stream_options": json_values,
        "n": json_values,
        "tools": json_values,
        "temperature": json_values,
        "user": any_text,
    },
)
tts_bodies = st.fixed_dictionaries(
    {"Text": st.text(max_size=40) | any_text | json_values},
    optional={
        "Format": st.sampled_from(["pcm", "wav", "mp3", "PCM", "flac"]) | json_values,
        "SampleRate": st.sampled_from([8000, 16000, 24000, 44100, 7999, 96000]) | json_values,
        "Channel": st.sampled_from([1, 2, 3]) | json_values,
        "Voice": st.text(max_size=20) | json_values,
    },
)


def _send(port: int, path: bytes, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """One POST over a raw socket (no client library validating anything); the status."""
    return _request(port, "POST", path, headers, body)


def _request(port: int, method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> int:
    head = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
            b"Content-Length: %d" % len(body)]
    head += [name + b": " + value for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line = received.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), received[:200]
    return int(status_line.split(b" ")[1])


def _chat(proxy: Proxy, body: bytes, task_suffix: bytes = b"", **extra: bytes) -> int:
    headers = [
        (b"Authorization", f"Bearer {API_KEY}".encode()),
        (b"Content-Type", b"application/json"),
        (b"X-Task-Id", PREFIX.encode() + task_suffix),
        *((name.replace("_", "-").encode(), value) for name, value in extra.items()),
    ]
    return _send(proxy.port, CHAT, body, headers)


def _assert_fine(status: int, server: Proxy) -> None:
    assert status < 500, f"{status}: {server.logs()[-2000:]}"


@FUZZ
@given(body=json_values)
def test_random_json_bodies(proxy: Proxy, body: Any) -> None:
    _assert_fine(_chat(proxy, json.dumps(body).encode(), uuid.uuid4().hex.encode()), proxy)


@FUZZ
@given(body=chat_bodies, task=st.text(max_size=20).map(str.encode))
def test_request_shaped_bodies(proxy: Proxy, body: dict[str, Any], task: bytes) -> None:
    _assert_fine(_chat(proxy, json.dumps(body).encode(), task), proxy)


@FUZZ
@given(raw=st.binary(max_size=300) | deep_json)
def test_random_bytes(proxy: Proxy, raw: bytes) -> None:
    _assert_fine(_chat(proxy, raw, uuid.uuid4().hex.encode()), proxy)


@FUZZ
@given(
    task=header_values, request=header_values, app=header_values, user=header_values,
    room=header_values, room_type=header_values,
)
def test_random_headers(proxy: Proxy, task: bytes, request: bytes, app: bytes, user: bytes, room: bytes, room_type: bytes) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
    status = _chat(
        proxy, body, task, X_Request_Id=request, X_Sdk_App_Id=app, X_User_Id=user, X_Room_Id=room, X_Room_Id_Type=room_type
    )
    _assert_fine(status, proxy)


def _pending(conn: Connection) -> int:
    return conn.execute(
        select(func.count()).select_from(Round).where(Round.task_id.startswith(PREFIX), Round.status == ROUND_PENDING)
    ).scalar_one()


def test_zz_after_the_fuzzing_nothing_is_pending_and_nothing_crashed(proxy: Proxy) -> None:
    # Runs after the tests above (same module, in file order) on the same server and database.
    assert run_db(proxy.database_url, _pending) == 0
    assert "Traceback" not in proxy.logs() and "unhandled error" not in proxy.logs()


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=tts_bodies | json_values.map(lambda v: {"Text": "hi", "Extra": v}) | any_text.map(lambda t: {"Text": t}),
    raw=st.none() | st.binary(max_size=100) | deep_json,
    user=header_values,
)
def test_tts_random_input(tts: Proxy, body: Any, raw: bytes | None, user: bytes) -> None:
    payload = raw if raw is not None else json.dumps(body).encode()
    headers = [(b"Authorization", f"Bearer {TTS_KEY}".encode()), (b"Content-Type", b"application/json"), (b"X-User-Id", user)]
    _assert_fine(_send(tts.port, TTS, payload, headers), tts)


def test_zz_tts_fuzzing_left_no_traceback(tts: Proxy) -> None:
    assert "Traceback" not in tts.logs()


# Callback events: signed (so they get past the signature), shaped like the orchestrator's with
# random values, and whatever else.
event_info = st.fixed_dictionaries(
    {},
    optional={
        "EventMsTs": st.integers() | json_values,
        "TaskId": st.text(max_size=300) | any_text | st.integers() | st.just("t" * 257) | st.just("a\x00b"),
        "RoomId": json_values,
        "RoomIdType": json_values,
        "Payload": st.fixed_dictionaries(
            {}, optional={"Text": json_values, "RoundId": json_values, "Tag": json_values, "Metric": json_values,
                          "Value": json_values, "LeaveCode": json_values},
        ) | json_values,
    },
)
callback_bodies = st.fixed_dictionaries(
    {"EventType": st.sampled_from([901, 902, 903, 905, 906, 908, 909]) | st.integers() | json_values},
    optional={"EventGroupId": st.integers() | json_values, "CallbackTs": st.integers() | json_values, "EventInfo": event_info | json_values},
)


@FUZZ
@given(body=callback_bodies | json_values, raw=st.none() | deep_json)
def test_signed_callbacks_with_random_fields(proxy: Proxy, body: Any, raw: bytes | None) -> None:
    payload = raw if raw is not None else json.dumps(body).encode()
    headers = [(b"Content-Type", b"application/json"), (b"Sign", sign(CALLBACK_KEY, payload).encode())]
    _assert_fine(_send(proxy.port, b"/api/v1/trtc/callback", payload, headers), proxy)


query_values = st.text(max_size=40) | any_text | st.sampled_from(
    ["2026-12-01", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2026-12-01T00:00:00", "x" * 5000, "9" * 5000]
)


@FUZZ
@given(
    route=st.sampled_from(["tasks", "stats", "tasks/ID", "users/APP/ID"]),
    params=st.dictionaries(st.sampled_from(["since", "until", "limit", "cursor", "user_id", "room_id", "sdk_app_id"]),
                           query_values, max_size=4),
    ident=query_values | st.just("a\x00b") | st.just("t" * 300),
    delete=st.booleans(),
)
def test_admin_api_with_random_parameters(proxy: Proxy, route: str, params: dict[str, str], ident: str, delete: bool) -> None:
    quoted = quote(ident.encode("utf-8", "surrogatepass"), safe="")
    path = "/admin/v1/" + route.replace("APP", quoted).replace("ID", quoted)
    query = urlencode({name: value.encode("utf-8", "surrogatepass") for name, value in params.items()})
    method = "DELETE" if delete and route != "stats" and route != "tasks" else "GET"
    status = _request(proxy.port, method, (path + ("?" + query if query else "")).encode(),
                      [(b"Authorization", f"Bearer {ADMIN_KEY}".encode())])
    _assert_fine(status, proxy)


def test_zz_callbacks_and_admin_fuzzing_left_no_traceback(proxy: Proxy) -> None:
    logs = proxy.logs()
    assert "Traceback" not in logs and "unhandled error" not in logs, logs[logs.find("Traceback") - 3000:][:6000]
