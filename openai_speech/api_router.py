"""HTTP routes of OpenAI's speech API: auth, parsing, and handing over to `serving`. Served by every
process that serves the TTS, with the TTS keys."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sse_starlette import EventSourceResponse

from core.auth import bearer_token, is_authorized
from core.limits import BodyTooLarge, read_body
from openai_speech.protocol import SpeechError, parse_request
from openai_speech.serving import speak, sse_events
from tts_server.remote import RemoteVoice
from tts_server.serving import TtsService

router = APIRouter()
log = logging.getLogger("trtc.tts")


def _authorize(request: Request) -> str:
    authorization = request.headers.get("authorization")
    if not is_authorized(authorization, request.app.state.tts_api_keys):
        raise SpeechError(401, 'Missing or invalid API key (Authorization: Bearer "<key>").', code="invalid_api_key")
    return bearer_token(authorization) or ""


@router.post("/v1/audio/speech")
async def create_speech(request: Request) -> Response:
    """A `SpeechError` raised here is answered by the app's `ApiError` handler."""
    key = _authorize(request)
    service: TtsService = request.app.state.tts
    try:
        raw = await read_body(request, service.settings.max_request_bytes)
    except BodyTooLarge as exc:
        raise SpeechError(exc.status, str(exc), code="request_too_large") from exc
    body = parse_request(raw)
    speech = await speak(service, body, key)
    log.info("speech %d chars, %s, voice %s, speed %g, model %r, %s", len(body.input), body.response_format,
             ",".join(speech.voices), body.speed, body.model[:64], body.stream_format)
    headers = {"X-TTS-Voice": ",".join(speech.voices)}
    if body.stream_format == "sse":
        return EventSourceResponse(sse_events(speech.audio, body.input), headers=headers)
    # No Content-Length: chunked, each piece as it is synthesized.
    return StreamingResponse(speech.audio, media_type=body.content_type, headers=headers)


@router.get("/v1/audio/voices")
async def list_voices(request: Request) -> Any:
    """The installed voices with their languages and other names (OpenAI's included), for pickers."""
    _authorize(request)
    voices = request.app.state.tts.voices
    return JSONResponse({
        "default": voices.default,
        "voices": [
            {"id": voice.info.name, "name": voice.info.name, "language": voice.info.language,
             "sample_rate": voice.info.sample_rate, "engine": voice.info.engine, "aliases": voices.aliases_of(voice.info.name),
             **(voice.listing() if isinstance(voice, RemoteVoice) else {})}
            for voice in voices.all
        ],
    })
