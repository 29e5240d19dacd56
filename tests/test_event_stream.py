"""The SSE response, driven directly through ASGI: what it writes, what a client leaving does to
the stream's generator, and that a streamed round leaves no garbage for the cyclic collector
(whose passes stall every request in flight)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, AsyncGenerator

from starlette.types import Message

from llm_proxy.event_stream import EventStream

SCOPE: dict[str, Any] = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}


class Client:
    """The ASGI side of one response: records what was sent, disconnects when told to."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.gone = asyncio.Event()

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def bodies(self) -> list[tuple[bytes, bool]]:
        return [(m["body"], m["more_body"]) for m in self.sent if m["type"] == "http.response.body"]


async def _chunks(n: int) -> AsyncGenerator[bytes, None]:
    for i in range(n):
        await asyncio.sleep(0)  # as the upstream's words do, let the loop run other tasks
        yield f"data: {i}\n\n".encode()


def test_events_are_written_in_order_then_the_body_ends() -> None:
    client = Client()
    asyncio.run(EventStream(_chunks(3))(SCOPE, client.receive, client.send))

    assert client.sent[0]["type"] == "http.response.start"
    assert (b"content-type", b"text/event-stream; charset=utf-8") in client.sent[0]["headers"]
    assert client.bodies() == [(b"data: 0\n\n", True), (b"data: 1\n\n", True), (b"data: 2\n\n", True), (b"", False)]


def test_a_client_leaving_mid_stream_closes_the_generator_at_once() -> None:
    client = Client()
    closed = asyncio.Event()

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: first\n\n"
            client.gone.set()  # the client leaves while the next words are awaited
            await asyncio.Event().wait()
            yield b"data: never\n\n"
        finally:
            closed.set()

    async def main() -> None:
        await asyncio.wait_for(EventStream(events())(SCOPE, client.receive, client.send), 5)

    asyncio.run(main())
    assert closed.is_set()
    assert client.bodies() == [(b"data: first\n\n", True)]


def test_streamed_responses_leave_no_cyclic_garbage() -> None:
    async def main() -> int:
        await EventStream(_chunks(3))(SCOPE, Client().receive, Client().send)  # imports, caches
        gc.collect()
        for _ in range(20):
            client = Client()
            await EventStream(_chunks(3))(SCOPE, client.receive, client.send)
        return gc.collect()

    gc.disable()
    try:
        assert asyncio.run(main()) == 0
    finally:
        gc.enable()
