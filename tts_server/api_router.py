"""HTTP routes of the TTS server: auth, parsing, and handing over to `TtsService`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from core.auth import bearer_token, is_authorized
from core.limits import BodyTooLarge, read_body
from tts_server.protocol import MAX_SPEED, MAX_VOLUME, MIN_SPEED, MIN_VOLUME, TtsError, parse_request, query_number
from tts_server.serving import TtsService, Utterance
from tts_server.remote import RemoteVoice

router = APIRouter()
log = logging.getLogger("trtc.tts")


def _service(request: Request) -> TtsService:
    return request.app.state.tts


def _authorize(request: Request) -> str:
    authorization = request.headers.get("authorization")
    if not is_authorized(authorization, request.app.state.tts_api_keys):
        raise TtsError(401, "UNAUTHORIZED", 'Missing or invalid API key (Authorization: Bearer "<key>").')
    return bearer_token(authorization) or ""


@router.post("/api/v1/tts/stream")
async def tts_stream(request: Request) -> Response:
    try:
        key = _authorize(request)
        service = _service(request)
        try:
            raw = await read_body(request, service.settings.max_request_bytes)
        except BodyTooLarge as exc:
            raise TtsError(exc.status, "REQUEST_TOO_LARGE", str(exc)) from exc
        body = parse_request(raw)
        query = request.query_params
        utterance = Utterance(
            body.text, body.format, body.sample_rate, body.channel,
            speed=query_number(query, "speed", MIN_SPEED, MAX_SPEED), volume=query_number(query, "volume", MIN_VOLUME, MAX_VOLUME),
        )
        voice = service.choose_voice(query.get("voice") or body.voice, key)
        log.info(
            "tts %d chars, %s %d Hz x%d, voice %s, speed %g, volume %g",
            len(body.text), body.format, body.sample_rate, body.channel, voice.info.name, utterance.speed, utterance.volume,
            extra={"sdk_app_id": request.headers.get("x-sdk-app-id"), "user_id": request.headers.get("x-user-id"),
                   "room_id": request.headers.get("x-room-id"), "room_id_type": request.headers.get("x-room-id-type")},
        )
        speech = await service.open(utterance, voice)
    except TtsError as error:
        return error.response()
    # No Content-Length: the server sends it chunked, as the orchestrator requires.
    return StreamingResponse(
        speech.audio, media_type=utterance.content_type, headers={"X-TTS-Voice": ",".join(speech.voices)}
    )


@router.get("/api/v1/tts/voices")
async def list_voices(request: Request) -> Any:
    try:
        _authorize(request)
    except TtsError as error:
        return error.response()
    service = _service(request)
    return JSONResponse(
        {
            "default": service.voices.default,
            "voices": [
                {
                    "name": voice.info.name, "language": voice.info.language, "sample_rate": voice.info.sample_rate,
                    "engine": voice.info.engine, "settings": voice.settings.model_dump(exclude_none=True),
                    "aliases": service.voices.aliases_of(voice.info.name),
                    **(voice.listing() if isinstance(voice, RemoteVoice) else {}),
                }
                for voice in service.voices.all
            ],
        }
    )
