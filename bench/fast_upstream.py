"""The benchmark's fake OpenAI upstream: a bare asyncio HTTP/1.1 server, so that on a 2-core
machine the upstream takes as little CPU from the proxy under test as it can.

It answers `POST /v1/chat/completions` with a streamed reply of N words (`[[words:N]]` in the
last message, default 20): a role chunk, one chunk per word, a finish chunk, a usage chunk when
`stream_options.include_usage` asks for it, then `[DONE]`, each written on its own like a model's
tokens. `GET /v1/models` lists one model. Keep-alive, chunked transfer, nothing else of HTTP.

    python bench/fast_upstream.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re

_WORDS = re.compile(rb"\[\[words:(\d+)\]\]")
_HEAD = b'data: {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake", "choices": ['
_MODELS = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]}).encode()


def _event(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    choice = json.dumps({"index": 0, "delta": delta, "finish_reason": finish}).encode()
    return _event(_HEAD + choice + b"]}\n\n")


@functools.lru_cache(maxsize=64)
def _reply(words: int, include_usage: bool) -> tuple[bytes, ...]:
    """The writes of one streamed reply, the response head with the first."""
    writes = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
              + _chunk({"role": "assistant", "content": ""})]
    writes += [_chunk({"content": f"w{i}" if i == 0 else f" w{i}"}) for i in range(words)]
    writes.append(_chunk({}, "stop"))
    if include_usage:
        usage = json.dumps({"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words}).encode()
        writes.append(_event(_HEAD[:-13] + b'"choices": [], "usage": ' + usage + b"}\n\n"))
    writes.append(_event(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return tuple(writes)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self._buffer) < end + 4 + length:
                return
            body = bytes(self._buffer[end + 4:end + 4 + length])
            del self._buffer[:end + 4 + length]
            self._answer(head.split(" ", 2)[:2], body)

    def _answer(self, request_line: list[str], body: bytes) -> None:
        assert self._transport is not None
        method, path = request_line
        if method == "GET" and path.rstrip("/").endswith("/models"):
            self._transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                  % (len(_MODELS), _MODELS))
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            self._transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return
        request = json.loads(body)
        found = _WORDS.findall(body)
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        for write in _reply(int(found[-1]) if found else 20, include_usage):
            self._transport.write(write)


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Connection, host, port, backlog=2048)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
