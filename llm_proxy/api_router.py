"""HTTP routes of the chat proxy: auth, parsing, and handing over to `ChatService`."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.auth import is_authorized
from app.errors import unauthorized
from llm_proxy.event_stream import EventStream
from llm_proxy.protocol import parse_request
from llm_proxy.serving import ChatService, sse_events, task_info

router = APIRouter()

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


def _service(request: Request) -> ChatService:
    return request.app.state.chat


def _authorize(request: Request) -> None:
    if not is_authorized(request.headers.get("authorization"), request.app.state.api_keys):
        raise unauthorized()


async def chat_completions(request: Request) -> Response:
    _authorize(request)
    body = parse_request(await request.body())
    task = task_info(request.headers)
    service = _service(request)
    try:
        if body.stream:
            reply = await _until_disconnect(request, service.open(body, task))
            return EventStream(sse_events(reply))
        return JSONResponse(await _until_disconnect(request, service.complete(body, task)))
    except ClientDisconnected:
        return Response(status_code=499)


# A plain Starlette route: the body is parsed by `parse_request`, so FastAPI's request handling
# (dependency solving, response serialization) would be cost without use on the hot path.
router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    _authorize(request)
    service = _service(request)
    configured = service.settings.upstream_model
    ids = [configured] if configured else await service.upstream.model_ids()
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "upstream"} for model_id in ids],
    }


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelled if the client disconnects first: before a response starts, nothing
    else would notice, and the upstream would go on generating for nobody. The work runs in this
    task (a task of its own cost a turn of the event loop on every request's way to its first
    token); a watcher task cancels this one."""
    current = asyncio.current_task()
    assert current is not None
    watching = True
    left = False

    def on_disconnect(_watcher: asyncio.Future[None]) -> None:
        nonlocal left
        if watching and not _watcher.cancelled():
            left = True
            current.cancel()

    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise
        current.uncancel()
        raise ClientDisconnected() from None
    finally:
        watching = False
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
