"""The SSE response of a streamed answer: sse-starlette's, with its first event sent at once.

sse-starlette writes the response from a task of its own (beside tasks that watch for the client
leaving and for shutdown), which starts on a later turn of the event loop, behind whatever else is
ready by then. The proxy has its first event in hand when the response begins (`ChatService.open`
returns only after the upstream's first token), so it writes the head and that event from the
request's own task, then lets sse-starlette stream the rest as usual.
"""

from __future__ import annotations

from typing import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send


class EventStream(EventSourceResponse):
    def __init__(self, events: AsyncIterator[bytes]) -> None:
        # No keep-alive pings: the proxy's streams are never silent for their 15 s.
        super().__init__(events, sep="\n", ping=0)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await anext(self._events, None)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if first is not None:
            await send({"type": "http.response.body", "body": first, "more_body": True})

        async def send_rest(message: Message) -> None:
            if message["type"] != "http.response.start":
                await send(message)

        await super().__call__(scope, receive, send_rest)
