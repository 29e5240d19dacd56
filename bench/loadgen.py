"""The benchmark's HTTP client: a bare asyncio HTTP/1.1 keep-alive client that posts a streamed
chat request and notes when the first text and `[DONE]` arrive.

A general client (httpx) costs about 1.7 ms of CPU per streamed round, which on a 2-core machine
is taken from the proxy under test; this one costs a small fraction of that. It understands only
what the benchmark needs: a status line, headers, and a chunked or sized body.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

_FIRST_TEXT = re.compile(rb'"content": ?"[^"]')
_DONE = b"data: [DONE]"


@dataclass
class Outcome:
    status: int = 0
    first: float | None = None  # perf_counter when the first text arrived
    done: float | None = None  # perf_counter when `data: [DONE]` arrived
    complete: bool = False  # the whole response was read


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time."""

    def __init__(self) -> None:
        self.open = False
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Outcome] | None = None
        self._reset()

    def _reset(self) -> None:
        self._buffer = bytearray()
        self._outcome = Outcome()
        self._in_head = True
        self._chunked = False
        self._remaining = 0  # sized body: bytes still to come
        self._tail = b""  # the end of the previous body piece, for matches split across pieces

    def exchange(self, request: bytes) -> asyncio.Future[Outcome]:
        assert self._transport is not None and self._waiter is None
        self._reset()
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return self._waiter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport)
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._finish()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._in_head:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            del self._buffer[:end + 4]
            self._in_head = False
            self._outcome.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == "transfer-encoding" and value == "chunked":
                    self._chunked = True
                elif name == "content-length":
                    self._remaining = int(value)
        if self._chunked:
            self._read_chunks()
        else:
            piece = bytes(self._buffer[:self._remaining])
            del self._buffer[:len(piece)]
            self._remaining -= len(piece)
            self._body(piece)
            if self._remaining == 0:
                self._end()

    def _read_chunks(self) -> None:
        while True:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self._buffer[:line_end].split(b";")[0], 16)
            if size == 0:
                if len(self._buffer) < line_end + 4:
                    return
                del self._buffer[:line_end + 4]
                self._end()
                return
            if len(self._buffer) < line_end + 2 + size + 2:
                return
            piece = bytes(self._buffer[line_end + 2:line_end + 2 + size])
            del self._buffer[:line_end + 2 + size + 2]
            self._body(piece)

    def _body(self, piece: bytes) -> None:
        seen = self._tail + piece
        self._tail = piece[-32:]
        outcome = self._outcome
        if outcome.first is None and _FIRST_TEXT.search(seen):
            outcome.first = time.perf_counter()
        if outcome.done is None and _DONE in seen:
            outcome.done = time.perf_counter()

    def _end(self) -> None:
        self._outcome.complete = True
        self._finish()

    def _finish(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._outcome)
        self._waiter = None


class Client:
    """Keep-alive connections to one `host:port`, as many as requests in flight."""

    def __init__(self, url: str) -> None:
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        self._host, port = hostport.rsplit(":", 1)
        self._port = int(port)
        self._idle: list[_Connection] = []

    async def post(self, path: str, body: dict, headers: dict[str, str]) -> Outcome:
        payload = json.dumps(body).encode()
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (f"POST {path} HTTP/1.1\r\nhost: {self._host}:{self._port}\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(payload)}\r\n{head}\r\n").encode() + payload
        connection = await self._connection()
        outcome = await connection.exchange(request)
        if connection.open and outcome.complete:
            self._idle.append(connection)
        return outcome

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.open:
                return connection
        _transport, connection = await asyncio.get_running_loop().create_connection(_Connection, self._host, self._port)
        return connection

    def close(self) -> None:
        for connection in self._idle:
            if connection._transport is not None:
                connection._transport.close()
        self._idle.clear()
