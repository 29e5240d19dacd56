"""Tenants kept apart and request ids that mean one request, through real HTTP on both
databases: a task belongs to the profile and X-Sdk-App-Id that created it; a request id reused
with other words is refused; nothing is lost either way."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from tests.conftest import ADMIN_KEY
from tests.support import API_KEY, Proxy, Upstream, marker

OTHER_KEY = "other-tenant-key"


@pytest.fixture(scope="module")
def two_profiles(migrated_url: str, upstream: Upstream, start_proxy_for_module, tmp_path_factory) -> Proxy:
    """One server, two profiles on one database: `home` (API_KEYS) and `other` (its own key)."""
    config = tmp_path_factory.mktemp("tenants") / "profiles.yaml"
    config.write_text(
        "profiles:\n"
        "  - {name: home, default: true}\n"
        f"  - {{name: other, keys: ['{OTHER_KEY}']}}\n"
    )
    return start_proxy_for_module(
        {"DATABASE_URL": migrated_url, "CONFIG_FILE": str(config), "ADMIN_API_KEYS": ADMIN_KEY}, in_process=True
    )


@pytest.fixture
def post(two_profiles: Proxy) -> Iterator:
    with httpx.Client(base_url=two_profiles.url, timeout=30) as http:

        def send(task_id: str, text: str, *, key: str = API_KEY, request_id: str | None = None, app: str = "1400",
                 user: str = "u1") -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}", "X-Task-Id": task_id, "X-Request-Id": request_id or marker(),
                       "X-Sdk-App-Id": app, "X-User-Id": user}
            body = {"model": "m", "messages": [{"role": "user", "content": text}]}
            return http.post("/v1/chat/completions", json=body, headers=headers)

        yield send


def _contents(server: Proxy, task_id: str) -> list[str]:
    return [m["content"] for r in server.rounds(task_id) for m in r["messages"]]


def test_another_profile_never_sees_or_changes_a_task(two_profiles: Proxy, post, upstream: Upstream) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    assert post(task_id, f"{tag} my password is hunter2").status_code == 200
    before = _contents(two_profiles, task_id)
    probe = marker()
    refused = post(task_id, f"{probe} what is my password?", key=OTHER_KEY)
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "task_owned_elsewhere" and task_id in error["message"]
    assert upstream.requests(probe) == []  # the other profile's upstream got nothing, least of all the history
    assert _contents(two_profiles, task_id) == before
    assert post(task_id, f"{tag} still me").status_code == 200  # the owner goes on
    assert f"{probe} what is my password?" not in _contents(two_profiles, task_id)


def test_another_app_on_the_same_profile_is_refused(two_profiles: Proxy, post) -> None:
    task_id = f"task-{marker()}"
    assert post(task_id, "hello", app="1400").status_code == 200
    refused = post(task_id, "hello again", app="1500")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "task_owned_elsewhere"
    # Without the header the request is the profile's own (its key is the boundary).
    assert post(task_id, "hello without an app", app="").status_code == 200
    assert len(two_profiles.rounds(task_id)) == 2
    assert two_profiles.task_row(task_id)["sdk_app_id"] == "1400"


def test_a_later_user_id_does_not_move_the_task(two_profiles: Proxy, post) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    assert post(task_id, "hi", user=f"first-{tag}").status_code == 200
    assert post(task_id, "hi again", user=f"second-{tag}").status_code == 200
    assert two_profiles.task_row(task_id)["user_id"] == f"first-{tag}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    deleted = httpx.delete(f"{two_profiles.url}/admin/v1/users/1400/first-{tag}", headers=admin).json()
    assert deleted["deleted"]["tasks"] == [task_id]
    assert two_profiles.task_row(task_id) is None


def test_a_request_id_reused_with_other_words_is_refused_and_loses_nothing(
    two_profiles: Proxy, post, upstream: Upstream
) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    first = post(task_id, f"{tag} first words", request_id="req-1")
    assert first.status_code == 200
    other = marker()
    refused = post(task_id, f"{other} other words", request_id="req-1")
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "request_id_reused" and "req-1" in error["message"]
    assert upstream.requests(other) == []
    # The orchestrator's real retry (same words) still replays; the new words go with a new id.
    retried = post(task_id, f"{tag} first words", request_id="req-1")
    assert retried.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert post(task_id, f"{other} other words", request_id="req-2").status_code == 200
    assert [r["request_id"] for r in two_profiles.rounds(task_id)] == ["req-1", "req-2"]
    assert _contents(two_profiles, task_id)[0] == f"{tag} first words"


def test_a_200_that_is_no_answer_is_a_502_and_stores_nothing(two_profiles: Proxy, post) -> None:
    for directive in ("[[content_type:text/html]]", "[[null_choices:1]]"):
        task_id = f"task-{marker()}"
        response = post(task_id, f"{directive} hello")
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "upstream_invalid"
        assert two_profiles.rounds(task_id) == []
    metrics = httpx.get(two_profiles.url + "/metrics").text
    assert 'trtc_llm_upstream_errors_total{kind="upstream_invalid"}' in metrics


def test_tool_results_from_another_profile_do_not_continue_the_round(two_profiles: Proxy) -> None:
    """The continuation of a round that called the client's tools checks the owner too."""
    task_id = f"task-{marker()}"
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    asked = {"role": "user", "content": '[[tool:get_weather:{"city": "Paris"}]]'}
    with httpx.Client(base_url=two_profiles.url, timeout=30) as http:

        def send(key: str, messages: list[dict]) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}", "X-Task-Id": task_id, "X-Request-Id": marker()}
            return http.post("/v1/chat/completions", json={"model": "m", "messages": messages, "tools": [weather]},
                             headers=headers)

        called = send(API_KEY, [asked])
        [call] = called.json()["choices"][0]["message"]["tool_calls"]
        answer = [asked, {"role": "assistant", "content": "", "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
        refused = send(OTHER_KEY, answer)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "task_owned_elsewhere"
        assert send(API_KEY, answer).status_code == 200
    assert [m["role"] for m in two_profiles.rounds(task_id)[0]["messages"]] == ["user", "assistant", "tool", "assistant"]
