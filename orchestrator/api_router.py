"""The route the orchestrator's server callbacks come to: signature, parsing, `CallbackService`."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from core.errors import ApiError
from core.limits import BodyTooLarge, read_body
from orchestrator.callbacks import CallbackService
from orchestrator.protocol import parse_event, signature_ok

router = APIRouter()
log = logging.getLogger("trtc.callbacks")


async def trtc_callback(request: Request) -> Response:
    settings = request.app.state.settings
    try:
        raw = await read_body(request, settings.max_request_bytes)
    except BodyTooLarge as exc:
        raise ApiError(exc.status, str(exc), "invalid_request_error", "request_too_large") from exc
    if settings.callback_sign_key:
        if not signature_ok(settings.callback_sign_key, raw, request.headers.get("sign")):
            raise ApiError(401, "Missing or wrong `Sign` header.", "invalid_request_error", "invalid_signature")
    elif not settings.callback_allow_unsigned:
        log.error(
            "callback refused: CALLBACK_SIGN_KEY is not set, so no signature can be checked "
            "(CALLBACK_ALLOW_UNSIGNED=true accepts callbacks without one)"
        )
        raise ApiError(401, "Callbacks are not enabled on this server.", "invalid_request_error", "callbacks_off")
    event, body = parse_event(raw)
    service: CallbackService = request.app.state.callbacks
    recorded = await service.receive(event, body)
    log.info(
        "callback %d%s", event.event_type, "" if recorded.new else " (a resend, already stored)",
        extra={"task_id": event.info.task_id, "trtc_round_id": event.round_id, "round_id": recorded.round_id},
    )
    return JSONResponse({"code": 0})


router.add_route("/api/v1/trtc/callback", trtc_callback, methods=["POST"])
