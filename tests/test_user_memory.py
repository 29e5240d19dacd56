"""Per-user memory (`memory.per_user`) through real HTTP on both databases: a task's rounds are
folded into its user's memory when the task ends (902) or goes idle; the user's next task starts
with it; another user, app or profile never sees it; deleting the user removes it from the
database and from every process's copy; a crashed fold is taken over; two tasks of a user folded at
once lose nothing."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from llm_proxy.agents import USER_MEMORY_HEADING
from llm_proxy.memory_context import UserKey
from llm_proxy.models import Task
from memory import store
from memory.models import Summary
from orchestrator.protocol import sign
from tests.conftest import ADMIN_KEY, CALLBACK_KEY
from tests.support import API_KEY, Upstream, headers, marker, run_db, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _config(upstream: Upstream, folder: Path, user_id: str = "meta.user_id") -> str:
    memory = (
        f"    memory: {{per_user: true, user_id: {user_id}, "
        f"upstream: {{base_url: '{upstream.base_url}', model: 'm[[summarize:1]]'}}}}\n"
    )
    config = folder / "profiles.yaml"
    config.write_text(
        "profiles:\n"
        "  - name: companion\n"
        "    default: true\n" + memory +
        "  - name: tutor\n"
        "    models: [tutor]\n" + memory
    )
    return str(config)


def _ask(server: Any, task_id: str, text: str, *, user: str | None, app: str | None, model: str = "m", **extra: str) -> None:
    body = {"MetaInfo": {"user_id": user}} if user is not None else {}
    server.client(timeout=10).chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], extra_body=body,
        extra_headers=headers(task_id, **({"X-Sdk-App-Id": app} if app is not None else {}), **extra),
    )


def _system(upstream: Upstream, text: str) -> str:
    """The system messages the upstream got with the turn `text`."""
    sent = upstream.requests(text)[-1]["messages"]
    return "\n".join(m["content"] for m in sent if m["role"] == "system")


def _end(server: Any, task_id: str) -> None:
    body = json.dumps({"EventGroupId": 9, "EventType": 902, "CallbackTs": 1, "EventInfo": {
        "EventMsTs": 1, "TaskId": task_id, "Payload": {"LeaveCode": 0}}}).encode()
    answer = httpx.post(server.url + "/api/v1/trtc/callback", content=body, headers={"Sign": sign(CALLBACK_KEY, body)})
    assert answer.json() == {"code": 0}


def _memory(server: Any, app: str, user: str) -> list[dict[str, Any]]:
    answer = httpx.get(server.url + f"/admin/v1/users/{app}/{user}/memory", headers=ADMIN)
    assert answer.status_code == 200
    return answer.json()["data"]


@pytest.fixture
def two_processes(start_proxy, upstream: Upstream, migrated_url: str, tmp_path: Path) -> tuple[Any, Any]:
    env = {"DATABASE_URL": migrated_url, "CONFIG_FILE": _config(upstream, tmp_path),
           "ADMIN_API_KEYS": ADMIN_KEY, "CALLBACK_SIGN_KEY": CALLBACK_KEY}
    return start_proxy(env, in_process=True), start_proxy(env, in_process=True)


def test_a_users_next_task_starts_with_their_memory_and_nobody_elses_does(two_processes: tuple[Any, Any], upstream: Upstream) -> None:
    a, b = two_processes
    tag = marker()
    app, user = f"app-{tag}", f"user-{tag}"
    first = f"task-{tag}-1"
    _ask(a, first, f"{tag} my daughter's name is Mia", user=user, app=app)
    _ask(a, first, f"{tag} she turns seven in May", user=user, app=app)
    assert USER_MEMORY_HEADING not in _system(upstream, f"{tag} she turns seven in May")
    # The 902 reaches the other process, which never served the task: it folds the rounds.
    _end(b, first)
    remembered = wait_until(lambda: _memory(a, app, user), timeout=30, what="the user's memory")
    assert [m["profile"] for m in remembered] == ["companion"]
    assert "Mia" in remembered[0]["text"] and "seven" in remembered[0]["text"]

    # The user's next task, on either process, starts with it, in every round.
    second = f"task-{tag}-2"
    _ask(b, second, f"{tag} hello again", user=user, app=app)
    _ask(a, second, f"{tag} what is her name?", user=user, app=app)
    for turn in (f"{tag} hello again", f"{tag} what is her name?"):
        system = _system(upstream, turn)
        assert system.startswith(USER_MEMORY_HEADING) and "Mia" in system
    detail = httpx.get(a.url + f"/admin/v1/tasks/{second}", headers=ADMIN).json()
    assert detail["user_memory"]["user_id"] == user and "Mia" in detail["user_memory"]["at_start"]

    # Another user, the same user id in another app, the same user with another profile: nothing.
    for n, (who, where, model) in enumerate(((f"other-{tag}", app, "m"), (user, f"other-app-{tag}", "m"), (user, app, "tutor"))):
        turn = f"{tag} stranger {n}"
        _ask(a, f"task-{tag}-x{n}", turn, user=who, app=where, model=model)
        assert "Mia" not in _system(upstream, turn)

    # Deleting the user removes the memory and every task it came from or went into (their
    # X-User-Id was never sent: the memory's user id is MetaInfo's), in both processes.
    deleted = httpx.delete(a.url + f"/admin/v1/users/{app}/{user}", headers=ADMIN).json()["deleted"]
    assert {first, second} <= set(deleted["tasks"]) and deleted["memories"] == 1
    assert _memory(b, app, user) == []
    _ask(b, second, f"{tag} after the deletion", user=user, app=app)  # b held a copy of the task's memory
    _ask(a, f"task-{tag}-3", f"{tag} a new task after the deletion", user=user, app=app)
    for turn in (f"{tag} after the deletion", f"{tag} a new task after the deletion"):
        assert "Mia" not in _system(upstream, turn)


def test_an_idle_task_is_folded_without_a_902_and_the_user_can_be_the_header(
    start_proxy, upstream: Upstream, migrated_url: str, tmp_path: Path
) -> None:
    """Also without X-Sdk-App-Id: the memory's app is then empty, and the admin routes reach it
    as app `-`."""
    config = _config(upstream, tmp_path, user_id="header.X-User-Id")
    server = start_proxy({"DATABASE_URL": migrated_url, "CONFIG_FILE": config, "ADMIN_API_KEYS": ADMIN_KEY,
                          "MEMORY_USER_IDLE_S": "1"}, in_process=True)
    tag = marker()
    user = f"user-{tag}"
    _ask(server, f"task-{tag}-1", f"{tag} I am allergic to peanuts", user=None, app=None, **{"X-User-Id": user})
    remembered = wait_until(lambda: _memory(server, "-", user), timeout=30, what="the idle task folded")
    assert "peanuts" in remembered[0]["text"]
    _ask(server, f"task-{tag}-2", f"{tag} suggest a snack", user=None, app=None, **{"X-User-Id": user})
    assert "peanuts" in _system(upstream, f"{tag} suggest a snack")
    # A request without a user id has no user memory (and a task of nobody's is folded nowhere).
    _ask(server, f"task-{tag}-3", f"{tag} who am I?", user=None, app=None)
    assert USER_MEMORY_HEADING not in _system(upstream, f"{tag} who am I?")
    deleted = httpx.delete(server.url + f"/admin/v1/users/-/{user}", headers=ADMIN).json()["deleted"]
    assert deleted["memories"] == 1 and _memory(server, "-", user) == []
    # `-` names "no app" there, so no request may call its app that.
    refused = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                         headers={"Authorization": f"Bearer {API_KEY}", **headers(f"task-{tag}-4", **{"X-Sdk-App-Id": "-"})})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "reserved_app_id"


def _task_of(url: str, task_id: str, user: UserKey) -> None:
    from llm_proxy import store as chat_store

    run_db(url, lambda conn: chat_store.claim_round(conn, chat_store.TaskInfo(task_id), max_rounds=5))
    run_db(url, store.view, task_id, user, "m")


def test_a_crashed_fold_is_taken_over_and_two_tasks_of_a_user_folded_at_once_lose_nothing(migrated_url: str) -> None:
    tag = marker()
    user = UserKey(f"app-{tag}", "companion", f"user-{tag}")
    one, two = f"task-{tag}-1", f"task-{tag}-2"
    _task_of(migrated_url, one, user)
    _task_of(migrated_url, two, user)
    fold_one = run_db(migrated_url, store.take_for_user, one, "process-a")
    assert fold_one is not None and (fold_one.after_seq, fold_one.up_to_seq) == (0, 1)
    assert run_db(migrated_url, store.take_for_user, one, "process-b") is None  # a holds it
    fold_two = run_db(migrated_url, store.take_for_user, two, "process-b")
    # Both read "no memory yet"; a writes first, b's write finds the memory moved and redoes it.
    assert run_db(migrated_url, store.write_user_memory, one, "process-a", fold_one, 1, "from one", None) == 1
    with pytest.raises(store.MemoryMoved):
        run_db(migrated_url, store.write_user_memory, two, "process-b", fold_two, 1, "from two", None)
    assert run_db(migrated_url, store.user_memory, user) == ("from one", 1)
    assert run_db(migrated_url, store.write_user_memory, two, "process-b", fold_two, 1, "from one and two", 1) == 2
    # a crashes holding task one: its hold runs out, and b goes on from what a marked folded.
    run_db(migrated_url, lambda conn: conn.execute(
        update(Summary).where(Summary.task_id == one).values(writer_until=datetime.now(timezone.utc) - timedelta(seconds=1))))
    taken_over = run_db(migrated_url, store.take_for_user, one, "process-b")
    assert taken_over is not None and taken_over.after_seq == 1 == taken_over.up_to_seq
    # A task deleted mid-fold: the write finds it gone and the memory stays as it was.
    from admin.lifecycle import delete_tasks

    run_db(migrated_url, delete_tasks, [one])
    assert run_db(migrated_url, store.write_user_memory, one, "process-b", taken_over, 1, "resurrected", 2) is None
    assert run_db(migrated_url, store.user_memory, user) == ("from one and two", 2)


def test_a_backlog_of_idle_tasks_is_folded_at_once_not_a_batch_a_minute(
    start_proxy, upstream: Upstream, migrated_url: str, tmp_path: Path
) -> None:
    """40 tasks idle for longer than MEMORY_USER_IDLE_S (900 s, whose sweep period is a minute):
    a process that starts folds them all in its first sweep, batch after batch."""
    tag = marker()
    tasks = [f"task-{tag}-{n}" for n in range(40)]
    for n, task_id in enumerate(tasks):
        _task_of(migrated_url, task_id, UserKey(f"app-{tag}", "companion", f"user-{tag}-{n}"))
    run_db(migrated_url, lambda conn: conn.execute(
        update(Task).where(Task.id.in_(tasks)).values(updated_at=datetime.now(timezone.utc) - timedelta(hours=1))))
    start_proxy({"DATABASE_URL": migrated_url, "CONFIG_FILE": _config(upstream, tmp_path)}, in_process=True)

    def folded() -> bool:
        rows = run_db(migrated_url, lambda conn: conn.execute(
            select(Summary.user_folded_seq).where(Summary.task_id.in_(tasks))).scalars().all())
        return len(rows) == 40 and all(seq == 1 for seq in rows)

    wait_until(folded, timeout=20, what="every idle task folded")
