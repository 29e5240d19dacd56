"""Process and database helpers shared by the tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

import asyncpg
import httpx
import openai
from sqlalchemy import select
from sqlalchemy.engine import Connection, make_url

from core.db import Database
from llm_proxy import store
from llm_proxy.models import Task

API_KEY = "test-key-1"
STARTUP_TIMEOUT_S = 90
ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("trtc-backend"))
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class ServerProcess:
    """A server in a child process on a free loopback port, its output in a log file."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            args, env={**os.environ, **env}, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
        )

    def _wait_ready(self, path: str) -> None:
        def up() -> bool:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(self.url + path, timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        try:
            # Sized for a loaded machine: a start takes 4-6 s here, several times that with the
            # other core busy.
            wait_until(up, timeout=STARTUP_TIMEOUT_S, what=f"{self.url}{path}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the server's log ends:\n{self.log_path.read_text()[-3000:]}") from None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc:
            self._log.close()

    def kill(self) -> None:
        """`kill -9`: no shutdown of any kind, as in a crash or an OOM kill."""
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait()
        self._log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


class Upstream(ServerProcess):
    """The fake OpenAI upstream (`trtc-backend fake-upstream`)."""

    def __init__(self, log_path: Path, *, record: bool = True) -> None:
        super().__init__(log_path)
        self.base_url = f"{self.url}/v1"
        self._record = record

    def start(self) -> None:
        record = [] if self._record else ["--no-record"]
        self._spawn([CLI, "fake-upstream", "--port", str(self.port), *record], {}, self.log_path.parent)
        self._wait_ready("/v1/models")

    def requests(self, marker: str) -> list[dict[str, Any]]:
        """Bodies of the chat requests whose last message contains `marker`."""
        everything = httpx.get(self.url + "/_requests").json()
        return [r["body"] for r in everything if marker in str(r["body"]["messages"][-1].get("content"))]

    def abandoned(self, marker: str) -> list[dict[str, Any]]:
        return [a for a in httpx.get(self.url + "/_abandoned").json() if marker in a["said"]]


class Proxy(ServerProcess):
    """A `trtc-backend serve` process with its own working directory and settings."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(workdir / "server.log")
        self.workdir = workdir
        self.env = {"API_KEYS": API_KEY, "DATA_DIR": str(workdir / "data"), "LOG_LEVEL": "INFO", **env}
        self.database_url = self.env.get("DATABASE_URL") or f"sqlite:///{workdir / 'data' / 'trtc.db'}"

    def start(self, *extra: str) -> None:
        self._spawn([CLI, "serve", "--port", str(self.port), *extra], self.env, self.workdir)
        self._wait_ready("/healthz")

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, api_key: str = API_KEY, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def rounds(self, task_id: str) -> list[dict[str, Any]]:
        return run_db(self.database_url, store.round_messages, task_id)

    def task_row(self, task_id: str) -> dict[str, Any] | None:
        def fetch(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(select(Task).where(Task.id == task_id)).mappings().first()
            return dict(row) if row else None

        return run_db(self.database_url, fetch)


def run_db(url: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(conn, *args)` in one transaction on the database at `url`, from synchronous code."""

    async def run() -> Any:
        db = Database(url, pool_size=1, max_overflow=0)
        try:
            return await db.run(fn, *args)
        finally:
            await db.dispose()

    return asyncio.run(run())


def on_db(url: str, work: Callable[[Database], Any]) -> Any:
    """`await work(db)` with a `Database` on `url`, from synchronous code."""

    async def main() -> Any:
        db = Database(url)
        try:
            return await work(db)
        finally:
            await db.dispose()

    return asyncio.run(main())


def headers(task_id: str | None, request_id: str | None = None, **extra: str) -> dict[str, str]:
    """The orchestrator's headers for one request; a fresh request id unless one is given."""
    out = dict(extra)
    if task_id is not None:
        out["X-Task-Id"] = task_id
        out["X-Request-Id"] = request_id or uuid.uuid4().hex
    return out


def first_text(stream: Any) -> str:
    """Read a streamed answer up to its first piece of text, and return that piece (the caller
    then closes the stream: the user interrupts the bot)."""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return chunk.choices[0].delta.content
    raise AssertionError("the stream ended without text")


def marker() -> str:
    """A unique word to find a request again at the upstream."""
    return "m" + uuid.uuid4().hex[:10]


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def postgres_execute(url: str, sql: str) -> None:
    """One statement outside a transaction (CREATE DATABASE, VACUUM)."""
    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_postgres_database(admin_url: str, name: str) -> None:
    await postgres_execute(admin_url, f'CREATE DATABASE "{name}"')


async def drop_postgres_database(admin_url: str, name: str) -> None:
    await postgres_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
