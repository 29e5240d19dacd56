"""HTTP routes of the chat proxy: auth, parsing, and handing over to `ChatService`."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from core.auth import bearer_token, is_authorized
from core.errors import ApiError, unauthorized
from core.limits import BodyTooLarge, read_body
from llm_proxy.disconnect import CancelOnDisconnect, ClientDisconnected
from llm_proxy.event_stream import EventStream
from llm_proxy.protocol import parse_request
from llm_proxy.serving import ChatService, close_unsent, sse_events, task_info

router = APIRouter()


def _service(request: Request) -> ChatService:
    return request.app.state.chat


def _authorize(request: Request) -> str | None:
    """The request's bearer key, if it is one this server takes (API_KEYS or a profile's)."""
    authorization = request.headers.get("authorization")
    if not is_authorized(authorization, _service(request).agents.keys):
        raise unauthorized()
    return bearer_token(authorization)


async def chat_completions(request: Request) -> Response:
    key = _authorize(request)
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
                reply = await service.open(body, task, key)
                return EventStream(sse_events(reply), on_close=partial(close_unsent, reply))
            return JSONResponse(await service.complete(body, task, key))
    except ClientDisconnected:
        return Response(status_code=499)


# A plain Starlette route: the body is parsed by `parse_request`, so FastAPI's request handling
# (dependency solving, response serialization) would be cost without use on the hot path.
router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    _authorize(request)
    agents = _service(request).agents
    ids = agents.profiles.model_names()
    if not ids:
        # No profile names a model: what the default profile's upstream serves.
        agent = agents.select(None, None)
        ids = [agent.upstream_config.model] if agent.upstream_config.model else await agent.upstream.model_ids()
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "upstream"} for model_id in ids],
    }

