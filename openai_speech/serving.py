"""One OpenAI speech request on the TTS server's engine: the same voices, pieces, normalisation,
deadline scheduling and phrase cache as the TRTC route (`TtsService`), in OpenAI's formats, as
encoded audio or as SSE events."""

from __future__ import annotations

import base64
import json
from typing import AsyncIterator

from openai_speech.protocol import RATE, SpeechError, SpeechRequest, delta_event, done_event
from tts_server.protocol import TtsError
from tts_server.serving import Speech, TtsService, Utterance

# The parameter each of the TTS server's errors is about.
_PARAMS = {"UNKNOWN_VOICE": "voice", "TEXT_TOO_LONG": "input", "UNSUPPORTED_LANGUAGE": "input"}


async def speak(service: TtsService, request: SpeechRequest, api_key: str) -> Speech:
    """The speech, its first piece synthesized (what can still fail as an HTTP error has)."""
    utterance = Utterance(request.input, request.codec, RATE, 1, speed=request.speed)
    try:
        return await service.open(utterance, service.choose_voice(request.voice, api_key))
    except TtsError as error:
        # OpenAI answers 400 for an input over its limit, as for any other bad input.
        raise SpeechError(400 if error.status == 413 else error.status, error.message, code=error.code.lower(),
                          param=_PARAMS.get(error.code)) from error


async def sse_events(audio: AsyncIterator[bytes], text: str) -> AsyncIterator[str]:
    """`speech.audio.delta` with each piece's audio in base64 as it is synthesized, then
    `speech.audio.done`: the events' `data`."""
    async for chunk in audio:
        if chunk:
            yield json.dumps(delta_event(base64.b64encode(chunk).decode("ascii")))
    yield json.dumps(done_event((len(text) + 3) // 4))
