"""uvicorn's HTTP protocol (httptools), guarded against clients that never send a proper request.

What it adds, each before any route, key check or body parsing runs:

- **A bound on the request head** (`HTTP_MAX_HEAD_BYTES`, 64 KiB): counted as the bytes arrive,
  and only as many as the head may still take are handed to the parser, so one connection sending
  a 100 MB header line costs 64 KiB of parsing and gets 431. (httptools itself has no limit, and
  builds a long header value by repeated concatenation: 100 MB took 14 CPU-seconds.)
- **A deadline on the request head** (`HTTP_HEAD_TIMEOUT_S`, 5 s): a new connection, or a kept-alive
  one that started its next request, that has not sent a whole head by then gets 408 and is
  closed (slow-header clients held 20,000 connections open until the file descriptors ran out). An
  idle kept-alive connection is uvicorn's `timeout_keep_alive`.
- **A cap on connections per process** (`HTTP_MAX_CONNECTIONS`, 1,000): one past it is answered 503
  at once and closed, so the process keeps its descriptors for the connections it serves.
- **A lingering close** for requests it refuses: uvicorn answers a malformed request with 400 and
  closes at once. When the client's bytes are not all read by then, closing with unread data makes
  the kernel send a reset, and the client never sees the answer. Here the answer is sent, our side
  is shut (FIN), the rest of the request is read and dropped, and the connection is closed when the
  client closes its side, or after `LINGER_S` (as nginx's `lingering_close` does).

Each refusal is counted on /metrics (`trtc_http_refused_total{reason}`) and logged: the first at once,
the rest as one line per reason every `_LOG_EVERY_S` with how many there were.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.metrics import HTTP_REFUSED
from core.settings import Settings, get_settings

# How long a connection whose request was refused may keep sending before it is closed anyway.
LINGER_S = 2.0
_LOG_EVERY_S = 10.0
_REASONS = {
    "head_too_large": (431, b"Request Header Fields Too Large"),
    "head_timeout": (408, b"Request Timeout"),
    "too_many_connections": (503, b"Service Unavailable"),
    "malformed": (400, b"Bad Request"),
}
log = logging.getLogger("trtc.http")


class _Refusals:
    """Counts refusals per reason; logs the first at once, and those that follow within
    `_LOG_EVERY_S` as one line with their count at the end of it (a flood of refusals must not
    become a flood of log lines)."""

    def __init__(self) -> None:
        self._unlogged: dict[str, int] = {}
        self._details: dict[str, str] = {}
        self._logged_at: dict[str, float] = {}

    def add(self, reason: str, detail: str) -> None:
        HTTP_REFUSED.labels(reason).inc()
        self._details[reason] = detail
        pending = self._unlogged.get(reason, 0)
        self._unlogged[reason] = pending + 1
        wait = self._logged_at.get(reason, -_LOG_EVERY_S) + _LOG_EVERY_S - time.monotonic()
        if wait <= 0:
            self._log(reason)
        elif pending == 0:  # the first of a window: its line comes at the window's end
            asyncio.get_running_loop().call_later(wait, self._log, reason)

    def _log(self, reason: str) -> None:
        count, self._unlogged[reason] = self._unlogged.get(reason, 0), 0
        if count:
            self._logged_at[reason] = time.monotonic()
            log.warning("refused %d connection(s): %s", count, self._details[reason], extra={"reason": reason})


_refusals = _Refusals()


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int
    head_timeout_s: float
    max_connections: int

    @staticmethod
    def of(settings: Settings) -> Limits:
        return Limits(settings.http_max_head_bytes, settings.http_head_timeout_s, connection_cap(settings.http_max_connections))


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn makes one per connection, from the class it was given."""

    # None: this process's settings, read at its first connection (uvicorn's worker processes
    # import this class by name and build their settings from the environment). `protocol_for`
    # makes a class with given ones.
    limits: ClassVar[Limits | None] = None

    _lingering = False
    # The bytes since the current request's head began (or the connection opened), while the head
    # is not complete; None while a request's body or response is under way.
    _head_bytes: int | None = 0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cls = type(self)
        if cls.limits is None:
            cls.limits = Limits.of(get_settings())
        self._limits = cls.limits
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            self._refuse("too_many_connections",
                         f"over HTTP_MAX_CONNECTIONS ({self._limits.max_connections}) in this process", linger=False)
            return
        self._head_timer = self.loop.call_later(self._limits.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self._head_bytes is not None:
            if self._head_bytes == 0 and self._head_timer is None:
                self._head_timer = self.loop.call_later(self._limits.head_timeout_s, self._head_timed_out)
            room = self._limits.max_head_bytes - self._head_bytes
            if len(data) > room:
                # Only what the head may still take goes to the parser; past it, a head that has
                # not ended is refused, and what followed an ended one is parsed as usual.
                head, data = data[:room], data[room:]
                self._head_bytes += len(head)
                super().data_received(head)
                if self._lingering or self.transport.is_closing():
                    return
                if self._head_bytes is not None:
                    self._refuse("head_too_large", f"a request head over HTTP_MAX_HEAD_BYTES ({self._limits.max_head_bytes})")
                    return
            else:
                self._head_bytes += len(data)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes = 0  # what comes next is the next request's head

    def send_400_response(self, msg: str) -> None:
        self._refuse("malformed", "a malformed request", body=msg.encode("ascii"))

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None and not self.transport.is_closing():
            self._refuse("head_timeout", f"no whole request head within HTTP_HEAD_TIMEOUT_S ({self._limits.head_timeout_s:g} s)")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, reason: str, detail: str, *, body: bytes | None = None, linger: bool = True) -> None:
        """Answer with the reason's status and close: after the client's rest is read (`linger`),
        or at once."""
        _refusals.add(reason, detail)
        self._cancel_head_timer()
        status, phrase = _REASONS[reason]
        body = body if body is not None else phrase
        head = [b"HTTP/1.1 %d %s" % (status, phrase),
                *(name + b": " + value for name, value in self.server_state.default_headers),
                b"content-type: text/plain; charset=utf-8", b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._lingering = True
        if not linger:
            self.transport.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def eof_received(self) -> None:
        if self._lingering:
            self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with the limits of `settings` (a server in a process that serves
    others with other settings: the tests' in-process servers)."""
    return type("HttpProtocol", (GuardedHttpToolsProtocol,), {"limits": Limits.of(settings)})


# Descriptors kept for what is not a client connection: the database pool, files, the loop's own.
_FD_RESERVE = 100


def connection_cap(wanted: int) -> int:
    """`wanted`, or less where the process's descriptors could not hold that many: each client
    connection may need a second descriptor for its upstream call. The soft limit is raised to the
    hard one first (Debian's default soft limit is 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    fits = max(1, (soft - _FD_RESERVE) // 2)
    if wanted > fits:
        log.warning("HTTP_MAX_CONNECTIONS %d lowered to %d: the process may open %d files", wanted, fits, soft)
        return fits
    return wanted
