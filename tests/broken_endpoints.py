"""LLM and TTS endpoints that each break one rule of the orchestrator's protocol, for the
validator's tests: `/{mode}/v1/chat/completions` and `/{mode}/tts`. Served by uvicorn in a child
process (`python -m uvicorn tests.broken_endpoints:app`)."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPLY = ["Hello there. ", "I am a test ", "endpoint."]


def _chunk(text: str) -> str:
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}) + "\n\n"


async def chat(request: Request) -> Response:
    mode = request.path_params["mode"]
    if mode == "json":  # a plain completion where the orchestrator asked for a stream
        return JSONResponse({"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(REPLY)}}]})

    async def events() -> AsyncIterator[str]:
        if mode == "slow":
            await asyncio.sleep(1.5)
        for text in REPLY:
            yield _chunk(text)
        if mode != "no_done":
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def tts(request: Request) -> Response:
    mode = request.path_params["mode"]
    body = await request.json()
    if not body.get("Text"):
        if mode == "error_shape":
            return JSONResponse({"message": "no text"}, status_code=400)
        return JSONResponse({"error": {"code": "MISSING_TEXT", "message": "no text"}}, status_code=400)
    audio = bytes(16000 * 2 // 2)  # 0.5 s of silence at 16 kHz
    if mode == "sized":
        return Response(audio, media_type="audio/L16")
    media_type = "audio/x-wav" if mode == "ctype" else "audio/L16"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(audio), 4000):
            yield audio[start : start + 4000]

    return StreamingResponse(chunks(), media_type=media_type)


app = Starlette(routes=[
    Route("/{mode}/v1/chat/completions", chat, methods=["POST"]),
    Route("/{mode}/tts", tts, methods=["POST"]),
])
