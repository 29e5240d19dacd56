"""An engine that speaks OpenAI's `POST /v1/audio/speech` (CosyVoice, Fish Speech, GPT-SoVITS and
IndexTTS servers, OpenAI itself, this project's own speech API): the piece's text in, `pcm` (or
`wav`) out, read as it streams. The first bytes must come within `timeout_ms`; the audio may not
run past ten times what the text can need (nor past a minute a piece); connections are pooled,
at most `max_concurrency` of them."""

from __future__ import annotations

import asyncio
import io
import wave

import httpx
import numpy as np

from tts_server.engines import EngineError, RemoteVoiceConfig, Slots

# The longest a piece of text can need to be said, per character, generously (slow Mandarin is
# about 0.25 s a character), and the share of that an engine may send: past it, it is cut off.
_SECONDS_PER_CHAR = 0.3
_TOO_MUCH = 10
_MAX_PIECE_S = 60.0


class OpenAISpeechEngine:
    def __init__(self, config: RemoteVoiceConfig) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=config.base_url, headers=headers,
            limits=httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency),
            timeout=httpx.Timeout(_MAX_PIECE_S, connect=config.timeout_ms / 1000),
        )
        self._slots = Slots(config.max_concurrency)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def audio(self, text: str, priority: int = 0) -> np.ndarray:
        config = self.config
        body = {"model": config.model, "input": text, "voice": config.voice, "response_format": config.response_format}
        width = 2
        limit = int((1 + len(text) * _SECONDS_PER_CHAR) * _TOO_MUCH * config.sample_rate * width) + 4096
        parts: list[bytes] = []
        if priority == 0:
            # A stream's first piece waits for a slot no longer than for the engine's first audio.
            try:
                async with asyncio.timeout(config.timeout_ms / 1000):
                    await self._slots.acquire(priority)
            except TimeoutError:
                raise EngineError("busy", f"all {config.max_concurrency} requests to the engine stayed busy") from None
        else:
            await self._slots.acquire(priority)
        started = asyncio.get_running_loop().time()
        try:
            try:
                async with asyncio.timeout(config.timeout_ms / 1000) as first_audio:
                    async with self._client.stream("POST", "/audio/speech", json=body) as response:
                        if response.status_code != 200:
                            await response.aread()
                            raise _refusal(response)
                        size = 0
                        async for part in response.aiter_bytes():
                            if not parts:
                                # The first audio came: from here on, the piece's own bound.
                                first_audio.reschedule(started + _MAX_PIECE_S)
                            parts.append(part)
                            size += len(part)
                            if size > limit:
                                raise EngineError("too_much", f"more than {limit} bytes for {len(text)} characters")
            except TimeoutError:
                what = "the whole piece" if parts else "its first audio"
                raise EngineError("timeout", f"no {what} in time") from None
            except httpx.HTTPError as exc:
                raise EngineError("unreachable", f"{type(exc).__name__}: {exc}") from None
        finally:
            self._slots.release()
        return self._samples(b"".join(parts))

    def _samples(self, data: bytes) -> np.ndarray:
        if self.config.response_format == "wav":
            try:
                with wave.open(io.BytesIO(data)) as reader:
                    if reader.getsampwidth() != 2 or reader.getnchannels() != 1:
                        raise EngineError("garbage", "a WAV that is not 16-bit mono")
                    if reader.getframerate() != self.config.sample_rate:
                        raise EngineError("garbage", f"a WAV at {reader.getframerate()} Hz, not {self.config.sample_rate}")
                    data = reader.readframes(reader.getnframes())
            except (wave.Error, EOFError) as exc:
                raise EngineError("garbage", f"not a WAV: {exc}") from None
        if len(data) < 2:
            raise EngineError("garbage", "no audio")
        return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def _refusal(response: httpx.Response) -> EngineError:
    status = response.status_code
    detail = response.text[:200]
    if status == 429:
        return EngineError("rate_limited", f"HTTP 429: {detail}")
    if status >= 500:
        return EngineError("refused", f"HTTP {status}: {detail}")
    # 400 and 422 are about the text (the fallback would likely fail the same way only if it too
    # cannot read it; it is tried); 401/403/404 are the engine's settings.
    return EngineError("text_refused" if status in (400, 413, 422) else "refused", f"HTTP {status}: {detail}")
