"""HTTP routes of the chat proxy: auth, parsing, and handing over to `ChatService`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.auth import is_authorized
from app.errors import ApiError, unauthorized
from app.limits import BodyTooLarge, read_body
from llm_proxy.disconnect import CancelOnDisconnect, ClientDisconnected
from llm_proxy.event_stream import EventStream
from llm_proxy.protocol import parse_request
from llm_proxy.serving import ChatService, sse_events, task_info

router = APIRouter()


def _service(request: Request) -> ChatService:
    return request.app.state.chat


def _authorize(request: Request) -> None:
    if not is_authorized(request.headers.get("authorization"), request.app.state.api_keys):
        raise unauthorized()


async def chat_completions(request: Request) -> Response:
    _authorize(request)
    service = _service(request)
    try:
        raw = await read_body(request, service.settings.max_request_bytes)
    except BodyTooLarge as exc:
        raise ApiError(exc.status, str(exc), "invalid_request_error", "request_too_large") from exc
    body = parse_request(raw)
    task = task_info(request.headers)
    # Before a response starts nothing else would notice the client leaving, and the upstream
    # would go on generating for nobody.
    try:
        async with CancelOnDisconnect(request.receive):
            if body.stream:
                return EventStream(sse_events(await service.open(body, task)))
            return JSONResponse(await service.complete(body, task))
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

