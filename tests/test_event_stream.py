"""The SSE response, driven directly through ASGI: what it writes, what a client leaving does to
the stream's generator, and that a streamed round leaves no garbage for the cyclic collector
(whose passes stall every request in flight)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, AsyncGenerator

from starlette.types import Message

from llm_proxy.disconnect import run_to_the_end
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


async def _nothing() -> None:
    pass


def test_events_are_written_in_order_then_the_body_ends() -> None:
    client = Client()
    asyncio.run(EventStream(_chunks(3), _nothing)(SCOPE, client.receive, client.send))

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
        await asyncio.wait_for(EventStream(events(), _nothing)(SCOPE, client.receive, client.send), 5)

    asyncio.run(main())
    assert closed.is_set()
    assert client.bodies() == [(b"data: first\n\n", True)]


def test_a_client_gone_before_the_first_write_still_gets_its_round_closed() -> None:
    """A generator closed before it started runs none of its own cleanup: `on_close` is what
    stores the round then (the client left between the answer's first token and its first write)."""
    started, closed = asyncio.Event(), asyncio.Event()

    class Stalled(Client):
        async def send(self, message: Message) -> None:
            await asyncio.Event().wait()  # the response's start is never written

    async def events() -> AsyncGenerator[bytes, None]:
        started.set()
        yield b"data: never\n\n"

    async def on_close() -> None:
        closed.set()

    async def main() -> None:
        client = Stalled()
        client.gone.set()
        await asyncio.wait_for(EventStream(events(), on_close)(SCOPE, client.receive, client.send), 5)

    asyncio.run(main())
    assert closed.is_set() and not started.is_set()


def test_streamed_responses_leave_no_cyclic_garbage() -> None:
    async def main() -> int:
        await EventStream(_chunks(3), _nothing)(SCOPE, Client().receive, Client().send)  # imports, caches
        gc.collect()
        for _ in range(20):
            client = Client()
            await EventStream(_chunks(3), _nothing)(SCOPE, client.receive, client.send)
        return gc.collect()

    gc.disable()
    try:
        assert asyncio.run(main()) == 0
    finally:
        gc.enable()


def test_work_run_to_the_end_finishes_though_its_task_is_cancelled() -> None:
    """What stores a round: a client leaving cancels the request's task natively, at any await."""
    done: list[str] = []

    async def main() -> bool:
        go_on, started = asyncio.Event(), asyncio.Event()

        async def write() -> str:
            started.set()
            await go_on.wait()
            done.append("stored")
            return "stored"

        request = asyncio.ensure_future(run_to_the_end(write()))
        await started.wait()
        request.cancel()  # twice, as a watcher and a shutdown might
        await asyncio.sleep(0)
        request.cancel()
        go_on.set()
        try:
            await request
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(main()) and done == ["stored"]
