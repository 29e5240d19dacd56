"""The SSE response of a streamed answer: sse-starlette's response (its headers; the events are
encoded with its `ServerSentEvent`), written from the request's own task.

sse-starlette's `EventSourceResponse.__call__` runs every response as a task group of three tasks
(the stream, a client-disconnect listener, a server-shutdown listener) and cancels the two
listeners when the stream ends. Per round that is two more tasks, turns of the event loop before
the first event, and ~50 objects of cyclic garbage (each cancellation's traceback holds its
frames), which the garbage collector's passes then stall every request to free: at 90 rounds/s,
a 4-11 ms pass every second. Here the events go out from the request's task, one watcher task
cancels it if the client leaves, and the stream's generator is closed in every case, so the
round is stored with what the client received. On server shutdown a stream runs to its end
(uvicorn waits for it): a reply is a few seconds, and cutting it would only store it interrupted.
"""

from __future__ import annotations

from typing import AsyncGenerator, Awaitable, Callable

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from llm_proxy.disconnect import CancelOnDisconnect, ClientDisconnected


class EventStream(EventSourceResponse):
    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]]) -> None:
        """`on_close` runs after the events in every case: a generator closed before it started
        runs none of its own cleanup (the client left before the first write)."""
        # No keep-alive pings: the proxy's streams are never silent for their 15 s.
        super().__init__(events, sep="\n", ping=0)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with CancelOnDisconnect(receive):
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self._events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientDisconnected:
            pass
        finally:
            # Cancelled while a chunk was being written, the generator still waits at its yield.
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
                await self._on_close()
