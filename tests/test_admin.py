"""The admin API through real HTTP on both databases: off without ADMIN_API_KEYS, its own keys,
tasks filtered and paged, a task's rounds with what was heard, their timings, failures and
callback events, hourly stats, deletes that reach another process's history cache, and
retention."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

import openai

from orchestrator.protocol import sign
from tests.conftest import ADMIN_KEY, CALLBACK_KEY
from tests.support import API_KEY, Proxy, Upstream, headers, marker, run_db, wait_until


@pytest.fixture
def admin(proxy: Proxy) -> Proxy:
    """The session proxy, which has the admin API on (ADMIN_KEY)."""
    return proxy


def _get(server: Proxy, path: str, key: str = ADMIN_KEY, **params: Any) -> httpx.Response:
    return httpx.get(server.url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def _delete(server: Proxy, path: str, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.delete(server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def _chat(server: Proxy, task_id: str, text: str, user: str, room: str = "room-1", app: str = "1400") -> None:
    server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}],
        extra_headers=headers(task_id, **{"X-User-Id": user, "X-Room-Id": room, "X-Sdk-App-Id": app}),
    )


def _callback(server: Proxy, task_id: str, event_type: int, payload: dict[str, Any]) -> None:
    body = json.dumps({"EventGroupId": 9, "EventType": event_type, "CallbackTs": int(time.time() * 1000), "EventInfo": {
        "EventMsTs": int(time.time() * 1000), "TaskId": task_id, "RoomId": "room-1", "RoomIdType": 1,
        "Payload": payload}}).encode()
    response = httpx.post(server.url + "/api/v1/trtc/callback", content=body, headers={"Sign": sign(CALLBACK_KEY, body)})
    assert response.status_code == 200


def test_without_admin_keys_neither_the_admin_api_nor_the_console_exists(start_proxy, migrated_url: str) -> None:
    server = start_proxy({"DATABASE_URL": migrated_url}, args=())
    for path in ("/console", "/console/", "/console/console.js"):
        assert httpx.get(server.url + path, follow_redirects=False).status_code == 404
    response = _get(server, "/admin/v1/tasks", key=API_KEY)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_only_admin_keys_open_it(admin: Proxy) -> None:
    """No key, a wrong key and a chat key are all refused, on every route."""
    for path in ("/admin/v1/tasks", "/admin/v1/tasks/t", "/admin/v1/stats"):
        assert httpx.get(admin.url + path).status_code == 401
        for key in (API_KEY, "nope"):
            response = _get(admin, path, key=key)
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
    _callback(admin, task_id, 905, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Hello there."})
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


def test_only_admin_keys_delete(admin: Proxy) -> None:
    tag = marker()
    _chat(admin, f"task-{tag}", tag, f"user-{tag}")
    for key in (API_KEY, "nope"):
        assert _delete(admin, f"/admin/v1/tasks/task-{tag}", key=key).status_code == 401
        assert _delete(admin, f"/admin/v1/users/1400/user-{tag}", key=key).status_code == 401
    assert _get(admin, f"/admin/v1/tasks/task-{tag}").status_code == 200


def test_rounds_record_their_timing_and_failures(admin: Proxy) -> None:
    """The first-token time covers the upstream's delay; a request refused upstream is kept as a
    failure (its round is not); a reply cut by an upstream error keeps the error's code."""
    tag = marker()
    task_id = f"task-{tag}"
    _chat(admin, task_id, f"{tag} one [[first_delay:0.3]] [[words:3]] [[delay:0.1]]", f"user-{tag}")
    with pytest.raises(openai.InternalServerError):
        _chat(admin, task_id, f"{tag} two [[status:500]]", f"user-{tag}")
    stream = admin.client().chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": f"{tag} three [[words:5]] [[fail_after:2]]"}],
        extra_headers=headers(task_id, **{"X-User-Id": f"user-{tag}"}),
    )
    said = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for chunk in stream:
            said += [chunk.choices[0].delta.content or ""] if chunk.choices else []
    assert "".join(said)
    detail = _get(admin, f"/admin/v1/tasks/{task_id}").json()
    first, third = detail["rounds"]
    assert 300 <= first["first_token_ms"] < first["total_ms"] and first["total_ms"] >= 500
    assert first["error"] is None and first["status"] == "completed"
    assert third["error"] == "upstream_failed" and third["interrupted"]
    [failed] = detail["failed_requests"]
    assert failed["code"] == "upstream_failed" and failed["request_id"]
    [row] = _get(admin, "/admin/v1/tasks", user_id=f"user-{tag}").json()["data"]
    assert (row["rounds"], row["interrupted"], row["errors"]) == (2, 1, 2)


def test_orchestrator_metrics_join_their_round(admin: Proxy) -> None:
    """A 906 metric names the orchestrator's RoundId; once a 903 or 905 tied that id to our
    round, the metric shows with it, whichever came first."""
    tag = marker()
    task_id = f"task-{tag}"
    _chat(admin, task_id, f"{tag} [[reply:Fine, thanks.]]", f"user-{tag}")
    _callback(admin, task_id, 906, {"Metric": "llm_first_token", "Value": 812, "Tag": {"RoundId": f"r-{tag}"}})
    _callback(admin, task_id, 903, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Fine, thanks."})
    _callback(admin, task_id, 906, {"Metric": "tts_first_frame_latency", "Value": 240, "Tag": {"RoundId": f"r-{tag}"}})
    [round_] = _get(admin, f"/admin/v1/tasks/{task_id}").json()["rounds"]
    assert round_["orchestrator_metrics"] == {"llm_first_token": 812, "tts_first_frame_latency": 240}


def test_stats_count_rounds_and_their_percentiles_per_hour(admin: Proxy) -> None:
    since = _get(admin, "/admin/v1/stats").json()["until"]
    tag = marker()
    for n in range(4):
        _chat(admin, f"task-{tag}", f"{tag} {n} [[first_delay:0.{n}5]]", f"user-{tag}")
    with pytest.raises(openai.RateLimitError):
        _chat(admin, f"task-{tag}", f"{tag} refused [[status:429]]", f"user-{tag}")
    stats = _get(admin, "/admin/v1/stats", since=since).json()
    rounds = _get(admin, f"/admin/v1/tasks/task-{tag}").json()["rounds"]
    firsts = sorted(r["first_token_ms"] for r in rounds)
    total = stats["total"]
    assert total["rounds"] == 4
    assert total["outcomes"] == {"completed": 4, "interrupted": 0, "upstream_error": 0, "failed": 1}
    # Nearest rank: of 4, p50 is the 2nd, p90 and p99 the 4th.
    assert total["first_token_ms"] == {"p50": firsts[1], "p90": firsts[3], "p99": firsts[3]}
    assert firsts[0] >= 50 and firsts[3] >= 350
    assert sum(hour["rounds"] for hour in stats["hours"]) == 4
    assert all(hour["hour"].endswith(":00:00+00:00") for hour in stats["hours"])
    bad = _get(admin, "/admin/v1/stats", since="2026-01-01T00:00:00Z", until="2025-01-01T00:00:00Z")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_range"


def test_a_deleted_task_is_gone_also_from_another_process_s_cache(
    admin: Proxy, start_proxy, migrated_url: str, upstream: Upstream
) -> None:
    """Two processes on one database; the second holds the task's history in its cache. After
    the first deletes the task, the second's next round of it starts empty."""
    other = start_proxy({"DATABASE_URL": migrated_url})
    tag = marker()
    task_id = f"task-{tag}"
    _chat(other, task_id, f"{tag} my PIN is 4321", f"user-{tag}")
    _chat(other, task_id, f"{tag} remember it", f"user-{tag}")
    _callback(admin, task_id, 904, {"UserId": f"user-{tag}", "RoundId": f"r-{tag}"})
    deleted = _delete(admin, f"/admin/v1/tasks/{task_id}")
    assert deleted.status_code == 200 and deleted.json() == {"deleted": {"tasks": [task_id]}}
    assert _get(admin, f"/admin/v1/tasks/{task_id}").status_code == 404
    assert run_db(migrated_url, _event_count, task_id) == 0
    _chat(other, task_id, f"{tag} what was my PIN?", f"user-{tag}")
    [sent] = upstream.requests(f"{tag} what was my PIN?")
    assert [m["content"] for m in sent["messages"] if m["role"] != "system"] == [f"{tag} what was my PIN?"]
    [round_] = _get(admin, f"/admin/v1/tasks/{task_id}").json()["rounds"]
    assert round_["seq"] == 1
    assert _delete(admin, "/admin/v1/tasks/no-such-task").status_code == 404


def test_deleting_a_user_deletes_all_their_tasks_and_nothing_else(admin: Proxy, migrated_url: str) -> None:
    tag = marker()
    theirs = [f"task-{tag}-{n}" for n in range(3)]
    for task_id in theirs:
        _chat(admin, task_id, f"{tag} hi", f"user-{tag}")
        _callback(admin, task_id, 904, {"UserId": f"user-{tag}", "RoundId": f"r-{task_id}"})
    _chat(admin, f"task-{tag}-same-user-other-app", f"{tag} hi", f"user-{tag}", app="1500")
    _chat(admin, f"task-{tag}-someone-else", f"{tag} hi", f"other-{tag}")
    response = _delete(admin, f"/admin/v1/users/1400/user-{tag}")
    assert response.status_code == 200 and sorted(response.json()["deleted"]["tasks"]) == theirs
    for task_id in theirs:
        assert _get(admin, f"/admin/v1/tasks/{task_id}").status_code == 404
        assert run_db(migrated_url, _event_count, task_id) == 0
    assert _get(admin, f"/admin/v1/tasks/task-{tag}-same-user-other-app").status_code == 200
    assert _get(admin, f"/admin/v1/tasks/task-{tag}-someone-else").status_code == 200
    again = _delete(admin, f"/admin/v1/users/1400/user-{tag}")
    assert again.status_code == 200 and again.json()["deleted"]["tasks"] == []


def test_retention_purges_tasks_last_active_too_long_ago(start_proxy, migrated_url: str) -> None:
    """Tasks made old in the database go, with their rounds, messages and events; a recent one
    stays; so do events of a recent task this server never stored. So do users' memories: an old
    one goes, a recent one stays."""
    server = start_proxy({
        "DATABASE_URL": migrated_url, "ADMIN_API_KEYS": ADMIN_KEY, "CALLBACK_SIGN_KEY": CALLBACK_KEY,
        "RETENTION_DAYS": "2", "RETENTION_INTERVAL_S": "0.2",
    })
    tag = marker()
    old = [f"task-{tag}-old-{n}" for n in range(3)]
    for task_id in [*old, f"task-{tag}-new"]:
        _chat(server, task_id, f"{tag} hi", f"user-{tag}")
        _callback(server, task_id, 904, {"UserId": f"user-{tag}", "RoundId": f"r-{task_id}"})
    _callback(server, f"task-{tag}-never-chatted", 904, {"UserId": f"user-{tag}", "RoundId": "r"})
    run_db(migrated_url, _age, old, 3)
    run_db(migrated_url, _remember, f"old-{tag}", 3)
    run_db(migrated_url, _remember, f"new-{tag}", 0)

    def purged() -> bool:
        return all(_get(server, f"/admin/v1/tasks/{task_id}").status_code == 404 for task_id in old) and not _memory_of(
            server, f"old-{tag}")

    wait_until(purged, what="retention to delete the old tasks")
    for task_id in old:
        assert run_db(migrated_url, _event_count, task_id) == 0
        assert run_db(migrated_url, _round_count, task_id) == 0
    assert _get(server, f"/admin/v1/tasks/task-{tag}-new").status_code == 200
    assert run_db(migrated_url, _event_count, f"task-{tag}-never-chatted") == 1
    assert [m["text"] for m in _memory_of(server, f"new-{tag}")] == [f"remembered of new-{tag}"]


def _remember(conn: Any, user_id: str, days_ago: float) -> None:
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import insert

    from memory.models import UserMemory

    then = datetime.now(timezone.utc) - timedelta(days=days_ago)
    conn.execute(insert(UserMemory).values(sdk_app_id="1400", profile="companion", user_id=user_id,
                                           text=f"remembered of {user_id}", version=1, created_at=then, updated_at=then))


def _memory_of(server: Proxy, user_id: str) -> list[dict[str, Any]]:
    return _get(server, f"/admin/v1/users/1400/{user_id}/memory").json()["data"]



def test_one_process_purges_and_another_takes_over_when_it_stops(start_proxy, migrated_url: str) -> None:
    """Two processes with retention on: the oldest live one purges; once it stops, the other does."""
    env = {"DATABASE_URL": migrated_url, "ADMIN_API_KEYS": ADMIN_KEY, "RETENTION_DAYS": "2", "RETENTION_INTERVAL_S": "0.2"}
    first, second = start_proxy(env), start_proxy(env)
    assert run_db(migrated_url, _retention_leader) == run_db(migrated_url, _oldest_retention_instance)
    tag = marker()
    for batch in ("a", "b"):
        old = [f"task-{tag}-{batch}-{n}" for n in range(2)]
        for task_id in old:
            _chat(second, task_id, f"{tag} hi", f"user-{tag}")
        run_db(migrated_url, _age, old, 3)
        wait_until(lambda: all(_get(second, f"/admin/v1/tasks/{t}").status_code == 404 for t in old),
                   what=f"batch {batch} purged")
        first.stop()


def _retention_leader(conn: Any) -> str | None:
    from llm_proxy.recovery import oldest_live_instance

    return oldest_live_instance(conn, "retention")


def _oldest_retention_instance(conn: Any) -> str:
    from sqlalchemy import select

    from llm_proxy.models import Instance

    return conn.execute(
        select(Instance.id).where(Instance.chores == "retention").order_by(Instance.started_at, Instance.id).limit(1)
    ).scalar_one()


def _event_count(conn: Any, task_id: str) -> int:
    from sqlalchemy import func, select

    from orchestrator.models import CallbackEvent

    return conn.execute(select(func.count()).where(CallbackEvent.task_id == task_id)).scalar_one()


def _round_count(conn: Any, task_id: str) -> int:
    from sqlalchemy import func, select

    from llm_proxy.models import Message, Round

    rounds = conn.execute(select(func.count()).where(Round.task_id == task_id)).scalar_one()
    orphans = conn.execute(
        select(func.count()).select_from(Message).where(~select(Round.id).where(Round.id == Message.round_id).exists())
    ).scalar_one()
    return rounds + orphans


def _age(conn: Any, task_ids: list[str], days: int) -> None:
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from llm_proxy.models import Task

    then = datetime.now(timezone.utc) - timedelta(days=days)
    conn.execute(update(Task).where(Task.id.in_(task_ids)).values(updated_at=then, created_at=then))


def test_deletion_notices_are_read_once_even_when_they_commit_out_of_order() -> None:
    from admin.lifecycle import NOTICE_GAP_S, NoticeCursor

    cursor = NoticeCursor(10)
    assert cursor.take([(11, "a"), (12, "b")], now=0) == ["a", "b"] and cursor.frontier == 12
    # 14 committed before 13: 14 is handled now, and 13 is still looked for.
    assert cursor.take([(14, "d")], now=1) == ["d"] and cursor.frontier == 12
    assert cursor.take([(13, "c"), (14, "d")], now=2) == ["c"] and cursor.frontier == 14
    # 15 never commits (a rolled-back delete): after NOTICE_GAP_S, reading moves past it.
    assert cursor.take([(16, "f")], now=3) == ["f"] and cursor.frontier == 14
    assert cursor.take([(16, "f")], now=4 + NOTICE_GAP_S) == [] and cursor.frontier == 16


def test_notice_ids_only_grow_after_old_notices_are_forgotten(tmp_path) -> None:
    from datetime import datetime, timedelta, timezone

    from admin.lifecycle import delete_tasks, forget_notices, last_notice
    from llm_proxy import store
    from migrations import upgrade

    url = f"sqlite:///{tmp_path / 'n.db'}"
    upgrade(url)
    for task_id in ("t1", "t2"):
        run_db(url, lambda conn, t=task_id: store.claim_round(conn, store.TaskInfo(t), max_rounds=5))
        run_db(url, delete_tasks, [task_id])
    before = run_db(url, last_notice)
    run_db(url, forget_notices, datetime.now(timezone.utc) + timedelta(seconds=1))
    run_db(url, lambda conn: store.claim_round(conn, store.TaskInfo("t3"), max_rounds=5))
    run_db(url, delete_tasks, ["t3"])
    assert run_db(url, last_notice) == before + 1
