"""Noticing that the client left: the user interrupted the bot, or the orchestrator gave up.

Nothing else tells a handler: uvicorn drops the writes of a closed connection silently, and a
round waiting for its upstream writes nothing. So a watcher task reads the request's ASGI
messages and cancels the request's own task when `http.disconnect` comes; the work itself stays
in that task (a task of its own would cost a turn of the event loop on every request's way to
its first token).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from functools import wraps
from typing import Any, Awaitable, Callable, Coroutine, ParamSpec, TypeVar

from starlette.types import Receive


T = TypeVar("T")
P = ParamSpec("P")


class ClientDisconnected(Exception):
    """The client closed the connection while the work ran; the work was cancelled."""


class CancelOnDisconnect:
    """`async with CancelOnDisconnect(receive):` runs its body until the client disconnects,
    which cancels the body and raises `ClientDisconnected` in its place."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Future[None] | None = None
        self._watching = False
        self._left = False

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        self._watching = True
        self._watcher = asyncio.ensure_future(_wait_for_disconnect(self._receive))
        self._watcher.add_done_callback(self._on_disconnect)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._watching = False
        assert self._watcher is not None and self._task is not None
        self._watcher.cancel()
        # The watcher's cancellation holds its frames; no reference back to it here, so that
        # all of it goes with reference counting, not in a pass of the cyclic collector.
        self._watcher = None
        if kind is asyncio.CancelledError and self._left:
            self._task.uncancel()
            raise ClientDisconnected() from None

    def _on_disconnect(self, watcher: asyncio.Future[None]) -> None:
        if self._watching and not watcher.cancelled():
            assert self._task is not None
            self._left = True
            self._task.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_to_the_end(work: Awaitable[T]) -> T:
    """Await `work` to its end even if this task is cancelled meanwhile, then raise the
    cancellation. `CancelOnDisconnect` cancels natively (`Task.cancel`), which an anyio shield
    does not hold off: a client leaving while its round was being stored left the round pending
    (until the orphan sweep settled it, its reply lost). The work runs as a task of its own."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = cancelled or not task.done()
    result = task.result()
    if cancelled:
        raise asyncio.CancelledError()
    return result


def runs_to_the_end(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A coroutine function whose every call is `run_to_the_end`."""

    @wraps(method)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return await run_to_the_end(method(*args, **kwargs))

    return run
