"""Auth, error shapes, operational endpoints, logs, key generation, and the schema."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timezone

import httpx
import openai
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url

from core.db import Base
from llm_proxy import store
import llm_proxy.models  # noqa: F401  (the tables on Base.metadata)
import orchestrator.models  # noqa: F401
from admin import models as _admin_models  # noqa: F401
from tests.conftest import postgres_url_or_skip
from tests.support import (
    API_KEY,
    Proxy,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    headers,
    marker,
    run_db,
    wait_until,
)

CHAT = "/v1/chat/completions"


def test_health_ready_and_metrics(proxy: Proxy, client: openai.OpenAI, task_id: str) -> None:
    assert httpx.get(proxy.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(proxy.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], extra_headers=headers(task_id))
    metrics = httpx.get(proxy.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    completed = [
        line for line in metrics.text.splitlines() if line.startswith('trtc_llm_rounds_total{outcome="completed"}')
    ]
    assert completed and float(completed[0].split()[-1]) >= 1
    assert "trtc_llm_first_token_seconds_bucket" in metrics.text


def test_models_come_from_the_upstream(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_configured_model_overrides_and_is_listed(start_proxy, upstream) -> None:
    server = start_proxy({"UPSTREAM_MODEL": "house-model"}, in_process=True)
    client = server.client()
    assert [m.id for m in client.models.list()] == ["house-model"]
    tag = marker()
    client.chat.completions.create(model="whatever", messages=[{"role": "user", "content": tag}])
    assert upstream.requests(tag)[0]["model"] == "house-model"


@pytest.mark.parametrize("key", [None, "wrong-key", "Basic abc"])
def test_requests_without_the_right_key_get_401(proxy: Proxy, key: str | None) -> None:
    auth = {} if key is None else {"Authorization": key if " " in key else f"Bearer {key}"}
    response = httpx.post(proxy.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=auth)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert set(response.json()["error"]) == {"message", "type", "code"}
    assert httpx.get(proxy.url + "/v1/models", headers=auth).status_code == 401


def test_wrong_key_through_the_official_client(proxy: Proxy) -> None:
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key="nope").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"model": "m"}).encode(), 422, "invalid_body"),
        (json.dumps({"model": "m", "messages": []}).encode(), 422, "invalid_body"),
        (json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 422, "invalid_body"),
        (json.dumps({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}).encode(), 422, "invalid_body"),
        (
            json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(),
            422,
            "invalid_body",
        ),
        (
            json.dumps({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).encode(),
            400,
            "no_user_message",
        ),
    ],
    ids=["bad-json", "not-object", "no-messages", "empty-messages", "bad-role", "n-2", "image-part", "no-new-user"],
)
def test_malformed_bodies_get_a_clear_error_and_store_nothing(
    proxy: Proxy, http: httpx.Client, task_id: str, body: bytes, status: int, code: str
) -> None:
    response = http.post(CHAT, content=body, headers={"Content-Type": "application/json", **headers(task_id)})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert proxy.rounds(task_id) == []
    assert f'"task_id": "{task_id}"' in proxy.logs()


def test_text_parts_are_accepted(client: openai.OpenAI, upstream, task_id: str) -> None:
    tag = marker()
    reply = client.chat.completions.create(
        model="m", extra_headers=headers(task_id),
        messages=[{"role": "user", "content": [{"type": "text", "text": tag}, {"type": "text", "text": " two"}]}],
    )
    assert reply.choices[0].message.content == f"You said: {tag} two"


def test_unknown_route_is_json(http: httpx.Client) -> None:
    response = http.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_every_request_logs_its_task_and_request_ids(proxy: Proxy, client: openai.OpenAI, task_id: str) -> None:
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_headers=headers(task_id, "req-logged")
    )

    def access_lines() -> list[dict]:
        lines = [json.loads(line) for line in proxy.logs().splitlines() if task_id in line]
        return [line for line in lines if line["logger"] == "trtc.access"]

    # Written once the response is sent, which the client may see first.
    access = wait_until(access_lines, timeout=5, what="the access line")
    assert access and access[0]["request_id"] == "req-logged" and access[0]["status"] == 200


@pytest.mark.parametrize(
    ("env", "status", "code"),
    [
        ({"UPSTREAM_BASE_URL": "http://127.0.0.1:{port}/v1"}, 502, "upstream_unreachable"),
        ({"UPSTREAM_TIMEOUT_S": "0.3"}, 504, "upstream_timeout"),
    ],
    ids=["unreachable", "timeout"],
)
def test_upstream_unreachable_or_slow(start_proxy, env: dict[str, str], status: int, code: str) -> None:
    server = start_proxy({k: v.format(port=free_port()) for k, v in env.items()}, in_process=True)
    task_id = f"task-{marker()}"
    response = httpx.post(
        server.url + CHAT,
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "[[first_delay:2]]"}]},
        headers={"Authorization": f"Bearer {API_KEY}", **headers(task_id)},
        timeout=10,
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert server.rounds(task_id) == []


def test_without_api_keys_a_key_is_generated_and_required(start_proxy, tmp_path) -> None:
    server = start_proxy({"API_KEYS": ""}, workdir=tmp_path / "keyless")
    key = (tmp_path / "keyless" / "data" / "api_key").read_text().strip()
    assert key.startswith("sk-trtc-") and len(key) > 30
    assert (tmp_path / "keyless" / "data" / "api_key").stat().st_mode & 0o077 == 0
    assert key in server.logs()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(server.url + CHAT, json=body).status_code == 401
    assert httpx.post(server.url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # What a restart does with it (`serve` resolves the keys before its workers start): reuses it.
    from core.auth import resolve_api_keys

    assert resolve_api_keys([], tmp_path / "keyless" / "data") == [key]


def test_migrations_and_models_agree(migrated_url: str) -> None:
    def diff(conn: Connection) -> list:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)

    assert run_db(migrated_url, diff) == []


def test_an_unreachable_database_is_reported_not_crashed_on(start_proxy) -> None:
    server = start_proxy(
        {"DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"}, migrate=False, in_process=True
    )
    response = httpx.get(server.url + "/readyz")
    assert response.status_code == 503 and response.json()["status"] == "unavailable"
    assert httpx.get(server.url + "/healthz").status_code == 200
    chat = httpx.post(
        server.url + CHAT,
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {API_KEY}", **headers(f"task-{marker()}")},
    )
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "database_unavailable"


def test_an_unmigrated_database_is_not_ready(start_proxy) -> None:
    server = start_proxy({}, migrate=False, in_process=True)
    response = httpx.get(server.url + "/readyz")
    assert response.status_code == 503
    assert "trtc-backend db upgrade" in response.json()["database"]


def test_metrics_add_up_over_several_workers(start_proxy) -> None:
    server = start_proxy({}, args=("--workers", "2"))

    async def one() -> None:
        # A connection of its own and a slow upstream, so both workers take requests.
        async with server.async_client() as client:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "[[first_delay:0.2]]"}],
                extra_headers=headers(f"task-{marker()}"),
            )

    async def many() -> None:
        await asyncio.gather(*(one() for _ in range(24)))

    asyncio.run(many())
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    completed = [line for line in lines if line.startswith('trtc_llm_rounds_total{outcome="completed"}')]
    assert completed and float(completed[0].split()[-1]) == 24


def test_sqlite_urls_with_or_without_the_async_driver_name_work(tmp_path) -> None:
    # Older configs name aiosqlite; SQLite transactions run on the database's own thread either way.
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"):
        assert run_db(url, lambda conn: conn.exec_driver_sql("PRAGMA journal_mode").scalar()) == "wal"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrading_a_database_keeps_its_conversations(backend: str, tmp_path) -> None:
    # SQLite alters tables by copying them: with foreign keys on, dropping the old `tasks`
    # would delete every round and message by cascade.
    from migrations import upgrade

    if backend == "sqlite":
        url, drop = f"sqlite:///{tmp_path / 'old.db'}", None
    else:
        admin = postgres_url_or_skip()
        name = f"trtc_upgrade_{uuid.uuid4().hex[:8]}"
        asyncio.run(create_postgres_database(admin, name))
        url = make_url(admin).set(database=name).render_as_string(hide_password=False)
        drop = lambda: asyncio.run(drop_postgres_database(admin, name))  # noqa: E731
    try:
        upgrade(url, "0003")

        def seed(conn: Connection) -> None:
            now = datetime.now(timezone.utc)
            conn.execute(text("INSERT INTO tasks (id, last_seq, version, edits, created_at, updated_at) VALUES ('t1', 1, 1, 0, :now, :now)"), {"now": now})
            conn.execute(text("INSERT INTO rounds (id, task_id, seq, status, interrupted, tokens, created_at) VALUES ('r1', 't1', 1, 'completed', false, 8, :now)"), {"now": now})
            conn.execute(text("INSERT INTO messages (round_id, position, role, content, tokens) VALUES ('r1', 0, 'user', 'hello', 4), ('r1', 1, 'assistant', 'hi', 4)"))

        run_db(url, seed)
        upgrade(url)
        rounds = run_db(url, lambda conn: store.round_messages(conn, "t1"))
        assert [r["messages"] for r in rounds] == [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]]
    finally:
        if drop is not None:
            drop()
