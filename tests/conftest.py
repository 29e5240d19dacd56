"""Real parts: a fake OpenAI upstream and the proxy run as separate uvicorn processes on loopback,
against real SQLite files and (with TEST_POSTGRES_URL) a fresh PostgreSQL database."""

from __future__ import annotations

import asyncio
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from sqlalchemy.engine import make_url

from tests.support import (
    API_KEY,
    InProcessProxy,
    Proxy,
    Upstream,
    create_postgres_database,
    drop_postgres_database,
)

BACKENDS = ["sqlite", "postgres"]
# The key the session proxy checks callback signatures with.
CALLBACK_KEY = "cbKey2026abc"
# The session proxy's admin key (the admin API and console are on there).
ADMIN_KEY = "admin-key-1"


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    fake = Upstream(tmp_path_factory.mktemp("upstream") / "upstream.log")
    fake.start()
    yield fake
    fake.stop()


def postgres_url_or_skip() -> str:
    url = os.environ.get("TEST_POSTGRES_URL")
    if not url:
        pytest.skip("PostgreSQL suite off: set TEST_POSTGRES_URL (e.g. make test-postgres)")
    return url


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database of each backend for the session."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "trtc.db"
        url = f"sqlite:///{path}"
        yield url
        return
    admin_url = postgres_url_or_skip()
    name = f"trtc_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(create_postgres_database(admin_url, name))
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    asyncio.run(drop_postgres_database(admin_url, name))


@pytest.fixture(scope="session")
def migrated_url(database_url: str) -> str:
    from migrations import upgrade

    upgrade(database_url)
    return database_url


@pytest.fixture(scope="session")
def proxy(migrated_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    server = Proxy(
        tmp_path_factory.mktemp("proxy"),
        {"DATABASE_URL": migrated_url, "UPSTREAM_BASE_URL": upstream.base_url, "CALLBACK_SIGN_KEY": CALLBACK_KEY,
         "ADMIN_API_KEYS": ADMIN_KEY},
    )
    server.start()
    yield server
    server.stop()


@contextmanager
def _stopped_at_the_end() -> Iterator[list[Any]]:
    """A list to put started servers in; all are stopped when the block ends, also on failure."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def _proxy_starter(upstream: Upstream, folder: Path, started: list[Proxy | InProcessProxy]) -> callable:
    """`start_proxy`'s function: a migrated proxy in `folder` talking to the fake upstream."""

    def start(
        env: dict[str, str],
        *,
        workdir: Path | None = None,
        migrate: bool = True,
        args: tuple[str, ...] = ("--only", "llm"),
        in_process: bool = False,
    ) -> Proxy | InProcessProxy:
        workdir = workdir or folder / f"proxy{len(started)}"
        env = {"UPSTREAM_BASE_URL": upstream.base_url, **env}
        if in_process:
            assert args == ("--only", "llm"), "an in-process proxy serves the chat proxy only"
        server = InProcessProxy(workdir, env) if in_process else Proxy(workdir, env)
        if migrate:
            from migrations import upgrade

            upgrade(server.database_url)
        started.append(server)
        if isinstance(server, InProcessProxy):
            server.start()
        else:
            server.start(*args)
        return server

    return start


@pytest.fixture
def start_proxy(upstream: Upstream, tmp_path: Path) -> Iterator[callable]:
    """Start extra chat proxies (`serve --only llm`: the TTS server's start is not paid where it
    is not used; `args=()` serves both) with their own settings; all are stopped after the test.
    `in_process=True` serves one from a thread of the test process (`InProcessProxy`), where
    a test needs no process of its own."""
    with _stopped_at_the_end() as started:
        yield _proxy_starter(upstream, tmp_path, started)


@pytest.fixture(scope="module")
def start_proxy_for_module(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[callable]:
    """`start_proxy` for servers that a module's tests share; stopped after the module."""
    with _stopped_at_the_end() as started:
        yield _proxy_starter(upstream, tmp_path_factory.mktemp("module"), started)


@pytest.fixture
def client(proxy: Proxy) -> openai.OpenAI:
    return proxy.client()


@pytest.fixture
def http(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture
def task_id() -> str:
    return f"task-{uuid.uuid4().hex[:12]}"


TTS_KEY = "tts-key-1"
# A key whose default voice is the eSpeak Mandarin fallback (TTS_KEY_VOICES).
TTS_ESPEAK_KEY = "tts-key-espeak"


@pytest.fixture(scope="session")
def steady_voices(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A VOICES_DIR whose voices.yaml turns piper's random timing off (`noise_w_scale: 0`) for the
    bundled voice: tests that compare two syntheses' durations then compare like with like (with
    it on, one sentence's length varies by about ±10%, which made such a test fail by chance)."""
    folder = tmp_path_factory.mktemp("steady-voices")
    (folder / "voices.yaml").write_text("voices:\n  en_US-joe-medium: {noise_w_scale: 0.0}\n")
    return str(folder)


@pytest.fixture(scope="session")
def tts(tmp_path_factory: pytest.TempPathFactory, steady_voices: str) -> Iterator[Proxy]:
    """The TTS server on its own (`serve --only tts`), as operators scale it."""
    server = Proxy(
        tmp_path_factory.mktemp("tts"),
        {"TTS_API_KEYS": f"{TTS_KEY},{TTS_ESPEAK_KEY}", "TTS_KEY_VOICES": f"{TTS_ESPEAK_KEY}:espeak-cmn",
         "VOICES_DIR": steady_voices},
    )
    server.start("--only", "tts")
    yield server
    server.stop()


@pytest.fixture
def start_tts(tmp_path: Path, steady_voices: str) -> Iterator[callable]:
    """Start extra TTS servers with their own settings (the steady voices unless `VOICES_DIR` is
    given); all are stopped after the test."""
    with _stopped_at_the_end() as started:

        def start(env: dict[str, str]) -> Proxy:
            server = Proxy(tmp_path / f"tts{len(started)}", {"TTS_API_KEYS": TTS_KEY, "VOICES_DIR": steady_voices, **env})
            started.append(server)
            server.start("--only", "tts")
            return server

        yield start
