"""The admin API through real HTTP on both databases: off without ADMIN_API_KEYS, its own keys,
tasks filtered and paged, a task's rounds with what was heard and its callback events."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from orchestrator.protocol import sign
from tests.conftest import CALLBACK_KEY
from tests.support import API_KEY, Proxy, headers, marker

ADMIN_KEY = "admin-key-1"


@pytest.fixture
def admin(start_proxy, migrated_url: str) -> Proxy:
    return start_proxy({"DATABASE_URL": migrated_url, "ADMIN_API_KEYS": ADMIN_KEY, "CALLBACK_SIGN_KEY": CALLBACK_KEY})


def _get(server: Proxy, path: str, key: str = ADMIN_KEY, **params: Any) -> httpx.Response:
    return httpx.get(server.url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def _chat(server: Proxy, task_id: str, text: str, user: str, room: str = "room-1") -> None:
    server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}],
        extra_headers=headers(task_id, **{"X-User-Id": user, "X-Room-Id": room, "X-Sdk-App-Id": "1400"}),
    )


def test_without_admin_keys_the_admin_api_does_not_exist(proxy: Proxy) -> None:
    response = _get(proxy, "/admin/v1/tasks", key=API_KEY)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_only_admin_keys_open_it(admin: Proxy) -> None:
    for key in (API_KEY, "nope"):
        response = _get(admin, "/admin/v1/tasks", key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_tasks_are_filtered_and_paged(admin: Proxy) -> None:
    tag = marker()
    user = f"user-{tag}"
    mine = [f"task-{tag}-{n}" for n in range(5)]
    for n, task_id in enumerate(mine):
        _chat(admin, task_id, f"{tag} {n}", user)
    _chat(admin, f"task-{tag}-other", f"{tag} other", f"other-{tag}")
    seen: list[str] = []
    cursor = None
    while True:
        page = _get(admin, "/admin/v1/tasks", user_id=user, limit=2, **({"cursor": cursor} if cursor else {})).json()
        assert len(page["data"]) <= 2
        seen += [row["task_id"] for row in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(mine))  # newest activity first, each task once
    first = _get(admin, "/admin/v1/tasks", user_id=user, limit=1).json()["data"][0]
    assert (first["rounds"], first["interrupted"], first["room_id"], first["sdk_app_id"]) == (1, 0, "room-1", "1400")
    future = _get(admin, "/admin/v1/tasks", user_id=user, since="2999-01-01T00:00:00+00:00").json()
    assert future["data"] == []
    assert _get(admin, "/admin/v1/tasks", room_id="no-such-room").json()["data"] == []


def test_a_task_shows_its_rounds_what_was_heard_and_its_events(admin: Proxy) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    reply = "Hello there. I can help you book a table for tonight."
    _chat(admin, task_id, f"{tag} [[reply:{reply}]]", f"user-{tag}")
    body = json.dumps({"EventGroupId": 9, "EventType": 905, "CallbackTs": int(time.time() * 1000), "EventInfo": {
        "EventMsTs": 1, "TaskId": task_id, "RoomId": "room-1", "RoomIdType": 1,
        "Payload": {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Hello there."}}}).encode()
    assert httpx.post(admin.url + "/api/v1/trtc/callback", content=body, headers={"Sign": sign(CALLBACK_KEY, body)}).status_code == 200
    detail = _get(admin, f"/admin/v1/tasks/{task_id}").json()
    [first] = detail["rounds"]
    assert first["messages"] == [
        {"role": "user", "content": f"{tag} [[reply:{reply}]]"},
        {"role": "assistant", "content": "Hello there."},
    ]
    assert first["unheard"] == " I can help you book a table for tonight."
    assert first["interrupted"] and first["trtc_round_id"] == f"r-{tag}" and first["profile"] == "default"
    assert [e["event_type"] for e in first["events"]] == [905]


@pytest.mark.parametrize(
    ("params", "code"),
    [({"cursor": "garbage"}, "invalid_cursor"), ({"limit": "0"}, "invalid_limit"), ({"since": "yesterday"}, "invalid_time")],
)
def test_bad_parameters_are_clear_errors(admin: Proxy, params: dict[str, str], code: str) -> None:
    response = _get(admin, "/admin/v1/tasks", **params)
    assert response.status_code == 400 and response.json()["error"]["code"] == code


def test_an_unknown_task_is_404(admin: Proxy) -> None:
    response = _get(admin, "/admin/v1/tasks/no-such-task")
    assert response.status_code == 404 and response.json()["error"]["code"] == "task_not_found"
