"""PostgreSQL faults: connections killed under load, the database refusing connections for a
while, and every URL spelling the README accepts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import uuid

import httpx
import openai
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection, make_url

from llm_proxy.models import ROUND_PENDING, Round
from tests.support import CLI, headers, marker, postgres_execute, run_db, wait_until

only_postgres = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
SYSTEM = {"role": "system", "content": "Be brief."}


def _database_name(url: str) -> str:
    return make_url(url).database or ""


def _admin_url(url: str) -> str:
    return os.environ["TEST_POSTGRES_URL"]


def _kill_connections(url: str) -> None:
    asyncio.run(postgres_execute(
        _admin_url(url),
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{_database_name(url)}' AND pid <> pg_backend_pid()",
    ))


def _pending(url: str, prefix: str) -> int:
    def count(conn: Connection) -> int:
        return conn.execute(
            select(func.count()).select_from(Round).where(Round.task_id.startswith(prefix), Round.status == ROUND_PENDING)
        ).scalar_one()

    return run_db(url, count)


@only_postgres
def test_connections_killed_under_load_end_every_round_cleanly(start_proxy, migrated_url: str) -> None:
    server = start_proxy({"DATABASE_URL": migrated_url})
    prefix = f"kill-{marker()}-"
    tasks = [f"{prefix}{i}" for i in range(20)]
    outcomes: dict[str, list[tuple[str, str]]] = {task: [] for task in tasks}

    async def conversation(client: openai.AsyncOpenAI, task_id: str) -> None:
        for n in range(3):
            try:
                stream = await client.chat.completions.create(
                    model="m", stream=True, extra_headers=headers(task_id),
                    messages=[SYSTEM, {"role": "user", "content": f"{task_id} {n} [[words:20]] [[delay:0.03]]"}],
                )
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                outcomes[task_id].append(("ok", text))
            except openai.APIError as error:
                outcomes[task_id].append(("error", str(error)))

    stop = threading.Event()

    def killer() -> None:
        while not stop.wait(0.25):
            _kill_connections(migrated_url)

    async def everyone() -> None:
        async with server.async_client() as client:
            await asyncio.gather(*(conversation(client, task) for task in tasks))

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        asyncio.run(everyone())
    finally:
        stop.set()
        thread.join()

    # Every round ended: stored, or refused with a clean error; none is left pending.
    wait_until(lambda: _pending(migrated_url, prefix) == 0, timeout=10, what="no round left pending")
    full = " ".join(f"w{i}" for i in range(20))
    ok = 0
    for task in tasks:
        stored = {r["messages"][0]["content"]: r for r in server.rounds(task)}
        for n, (kind, reply) in enumerate(outcomes[task]):
            if kind == "ok":
                ok += 1
                assert reply == full
                assert stored[f"{task} {n} [[words:20]] [[delay:0.03]]"]["messages"][-1]["content"] == full
    assert ok >= 50, outcomes  # the retries on a new connection save nearly every round
    assert "retrying on a new connection" in server.logs()  # the faults did happen
    assert "Traceback" not in server.logs()

    # New rounds go through at once, and /readyz says ready.
    assert httpx.get(server.url + "/readyz").status_code == 200
    client = server.client()
    for task in tasks:
        reply = client.chat.completions.create(
            model="m", extra_headers=headers(task), messages=[SYSTEM, {"role": "user", "content": f"{task} after"}]
        )
        assert reply.choices[0].message.content == f"You said: {task} after"


@only_postgres
def test_a_database_refusing_connections_is_reported_and_survived(start_proxy, migrated_url: str) -> None:
    server = start_proxy({"DATABASE_URL": migrated_url})
    name = _database_name(migrated_url)
    tag = marker()
    task_id = f"task-{tag}"
    client = server.client()
    client.chat.completions.create(model="m", extra_headers=headers(task_id), messages=[{"role": "user", "content": f"{tag} 1"}])
    asyncio.run(postgres_execute(_admin_url(migrated_url), f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
    try:
        _kill_connections(migrated_url)
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model="m", extra_headers=headers(task_id), messages=[{"role": "user", "content": f"{tag} 2"}]
            )
        assert caught.value.status_code == 503 and caught.value.body["code"] == "database_unavailable"
    finally:
        asyncio.run(postgres_execute(_admin_url(migrated_url), f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    wait_until(lambda: httpx.get(server.url + "/readyz").status_code == 200, timeout=10, what="ready again")
    reply = client.chat.completions.create(
        model="m", extra_headers=headers(task_id), messages=[{"role": "user", "content": f"{tag} 3"}]
    )
    assert reply.choices[0].message.content == f"You said: {tag} 3"
    assert [r["messages"][0]["content"] for r in server.rounds(task_id)] == [f"{tag} 1", f"{tag} 3"]
    assert "Traceback" not in server.logs()


@only_postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2", "postgresql+psycopg"])
def test_every_postgresql_url_spelling_means_asyncpg(migrated_url: str, tmp_path, scheme: str) -> None:
    url = make_url(migrated_url).set(drivername=scheme).render_as_string(hide_password=False)
    upgraded = subprocess.run(
        [CLI, "db", "upgrade"], env={**os.environ, "DATABASE_URL": url}, cwd=tmp_path, capture_output=True, text=True
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert run_db(url, lambda conn: conn.execute(text("SELECT 1")).scalar()) == 1


def test_every_sqlite_url_spelling_works(tmp_path) -> None:
    for scheme in ("sqlite", "sqlite+aiosqlite", "sqlite+pysqlite"):
        url = f"{scheme}:///{tmp_path / (uuid.uuid4().hex + '.db')}"
        upgraded = subprocess.run(
            [CLI, "db", "upgrade"], env={**os.environ, "DATABASE_URL": url}, cwd=tmp_path, capture_output=True, text=True
        )
        assert upgraded.returncode == 0, upgraded.stderr
