"""Process and database helpers shared by the tests."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from unittest import mock

import asyncpg
import httpx
import openai
import uvicorn
from sqlalchemy import select
from sqlalchemy.engine import Connection, make_url

from core.db import Database
from core.settings import Settings
from llm_proxy import store
from llm_proxy.models import Task

API_KEY = "test-key-1"
STARTUP_TIMEOUT_S = 90
ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("trtc-backend"))
T = TypeVar("T")


def _port_block() -> Iterator[int]:
    """This test process's own ports: below the kernel's ephemeral range (32768 and up here), so
    no outgoing connection takes one between the pick and the server's bind, and a block of 4000
    per xdist worker, so two workers never pick the same one."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    first = 20000 + (worker % 3) * 4000
    start = random.randrange(4000)
    for n in itertools.count():
        yield first + (start + n) % 4000


_ports = _port_block()


def free_port() -> int:
    """A port nothing listens on now, that this process has not handed out before."""
    for port in _ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable: the port block is endless")


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
        return [r["body"] for r in httpx.get(self.url + "/_requests", params={"marker": marker}).json()]

    def abandoned(self, marker: str) -> list[dict[str, Any]]:
        return [a for a in httpx.get(self.url + "/_abandoned").json() if marker in a["said"]]


class _Served:
    """What a test asks of a serving proxy, in a process or in this one."""

    url: str
    database_url: str

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


def _proxy_env(workdir: Path, env: dict[str, str]) -> dict[str, str]:
    return {"API_KEYS": API_KEY, "DATA_DIR": str(workdir / "data"), "LOG_LEVEL": "INFO", **env}


def _database_url(workdir: Path, env: dict[str, str]) -> str:
    return env.get("DATABASE_URL") or f"sqlite:///{workdir / 'data' / 'trtc.db'}"


class Proxy(ServerProcess, _Served):
    """A `trtc-backend serve` process with its own working directory and settings."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(workdir / "server.log")
        self.workdir = workdir
        self.env = _proxy_env(workdir, env)
        self.database_url = _database_url(workdir, self.env)

    def start(self, *extra: str) -> None:
        self._spawn([CLI, "serve", "--port", str(self.port), *extra], self.env, self.workdir)
        self._wait_ready("/healthz")

    def restart(self) -> None:
        self.stop()
        self.start()


class InProcessProxy(_Served):
    """The chat proxy served by uvicorn on a thread of the test process: a real socket and real
    HTTP, without the 2 s a process spends importing before it serves. For tests of what settings
    make of requests; what needs a process of its own (start-up checks, signals, crashes, logs,
    workers, PYTHONPATH) starts a `Proxy`."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = _proxy_env(workdir, {"SERVICES": "llm", **env})
        self.database_url = _database_url(workdir, self.env)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from app.http_protocol import protocol_for
        from app.main import create_app

        self.workdir.mkdir(parents=True, exist_ok=True)
        with mock.patch.dict(os.environ, self.env):
            settings = Settings()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, http=protocol_for(settings),
            log_config=None, access_log=False, lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()
        server, thread = self._server, self._thread
        wait_until(lambda: server.started or not thread.is_alive(), timeout=STARTUP_TIMEOUT_S, what=f"{self.url} to serve")
        if not server.started:
            raise AssertionError(f"{self.url} did not start: its lifespan failed (the error is in the captured log)")
        # The app's start freezes every object so far out of the collector's reach (right for a
        # server process); in the tests' process that would keep earlier tests' objects forever
        # and hide them from gc.get_referrers (which hypothesis relies on).
        gc.unfreeze()

    def stop(self) -> None:
        if self._server and self._thread:
            self._server.should_exit = True
            self._thread.join(timeout=15)


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
