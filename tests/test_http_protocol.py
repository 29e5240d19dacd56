"""`app/http_protocol.py` over raw sockets against a served proxy: an oversized request head gets
431 as it arrives, a head that never completes gets 408 and its connection closed, connections past
the cap get 503 at once; each refusal is counted and logged, and the server goes on serving."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from app import http_protocol
from core.metrics import HTTP_REFUSED

HEAD_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 30


@pytest.fixture(scope="module")
def server(start_proxy_for_module) -> Any:
    """On its own SQLite file: what is tested comes before any database."""
    return start_proxy_for_module(
        {"HTTP_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S), "HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}, in_process=True
    )


@pytest.fixture(autouse=True)
def fresh_log_budget() -> Iterator[None]:
    """Refusals are logged once per reason every 10 s in a process: each test starts unlogged."""
    http_protocol._refusals = http_protocol._Refusals()
    yield


def _refused(reason: str) -> float:
    return HTTP_REFUSED.labels(reason)._value.get()


def _read_all(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_giant_header_gets_431_as_it_arrives(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    before = _refused("head_too_large")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # A megabyte of one header line, and no end to it: the answer does not wait for one.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"x" * 1_000_000)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert _refused("head_too_large") == before + 1
    assert any("HTTP_MAX_HEAD_BYTES" in r.getMessage() for r in caplog.records if r.name == "trtc.http")
    # A large head under the bound is served.
    assert httpx.get(server.url + "/healthz", headers={"X-Pad": "y" * 60_000}).status_code == 200


def test_a_head_that_never_completes_is_closed_with_408(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    before = _refused("head_timeout")
    caplog.set_level(logging.WARNING, logger="trtc.http")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert _read_all(slow).startswith(b"HTTP/1.1 408 ")
        assert _read_all(silent).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 3
    assert _refused("head_timeout") == before + 2
    assert any("HTTP_HEAD_TIMEOUT_S" in r.getMessage() for r in caplog.records if r.name == "trtc.http")
    # A kept-alive connection whose next request starts and stalls is closed too.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200 ")
        kept.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _read_all(kept).startswith(b"HTTP/1.1 408 ")


def test_connections_past_the_cap_are_refused_at_once_and_the_server_serves_on(server: Any) -> None:
    before = _refused("too_many_connections")
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            assert _read_all(extra).startswith(b"HTTP/1.1 503 ")
        assert _refused("too_many_connections") >= before + 1
    finally:
        for sock in held:
            sock.close()
    # Once those are gone, it serves again (the held ones closed on our side first).
    deadline = time.monotonic() + 5
    while httpx.get(server.url + "/healthz").status_code != 200 and time.monotonic() < deadline:
        pass
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_flood_of_slow_heads_does_not_stop_the_server_answering(server: Any) -> None:
    """While 20 connections trickle a header byte a second, requests are served."""
    stop = threading.Event()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            while not stop.is_set():
                try:
                    sock.sendall(b"X")
                except OSError:
                    return
                stop.wait(0.2)

    threads = [threading.Thread(target=trickle) for _ in range(20)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(5):
            assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join()
