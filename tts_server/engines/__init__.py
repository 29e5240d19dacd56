"""Remote voice engines: one module per engine, each a class with one async method, `audio(text)`,
that returns the engine's speech for a piece of text as float32 samples at its configured rate or
raises `EngineError` with a reason (what the fallback and the metrics name). A third engine is a
module here and a line in `ENGINES`."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class EngineError(Exception):
    """The engine gave no usable audio for a piece; `reason` is a short label (refused,
    rate_limited, unreachable, timeout, too_much, garbage, text_refused, busy)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RemoteVoiceConfig(BaseModel):
    """A remote voice in `voices.yaml` (an entry with `engine:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str
    base_url: str
    api_key: str = ""
    model: str = Field(default="tts-1", min_length=1, max_length=256)
    # The engine's own name for the voice.
    voice: str = Field(default="alloy", min_length=1, max_length=256)
    # The rate of the engine's `pcm` (s16le mono).
    sample_rate: int = Field(default=24_000, ge=8_000, le=48_000)
    # `pcm` (raw s16le at `sample_rate`) or `wav` (decoded; its own header says the rate).
    response_format: str = Field(default="pcm", pattern="^(pcm|wav)$")
    # A local voice for when the engine fails: before the first audio, the whole text; after it,
    # the rest. None: a JSON error before the first audio, a clean end after it.
    fallback: str | None = None
    # The engine's first audio for a piece must come within this, or the fallback speaks.
    timeout_ms: int = Field(default=1500, ge=50, le=60_000)
    # Requests in flight to this engine from this process.
    max_concurrency: int = Field(default=4, ge=1, le=64)
    # What the voice speaks (a BCP 47-ish tag, `zh_CN`), for text routing and the voice lists.
    language: str = Field(default="en_US", min_length=2, max_length=16)
    # Gain and pause between pieces, as for local voices.
    volume: float = Field(default=1.0, gt=0, le=4)
    sentence_pause_s: float = Field(default=0.0, ge=0, le=3)

    @field_validator("engine")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ENGINE_NAMES:
            raise ValueError(f"unknown engine {value!r}; known: {', '.join(ENGINE_NAMES)}")
        return value

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.lower().startswith(("http://", "https://")) or len(value) < 10:
            raise ValueError(f"must be an http:// or https:// URL (got {value[:80]!r})")
        return value.rstrip("/")


class Engine(Protocol):
    async def audio(self, text: str, priority: int = 0) -> np.ndarray:
        """`priority`: the piece's place in its stream; a stream's first piece goes before other
        streams' pieces asked ahead when the engine's slots are all taken."""
        ...

    async def aclose(self) -> None: ...


ENGINE_NAMES = ("openai-speech",)


class Slots:
    """At most `size` requests in flight to an engine, a stream's first piece first: pieces asked
    ahead leave a quarter of the slots (at least one) to first pieces, and of the waiters the one
    with the lowest `priority` (a piece's place in its stream) is let in next, ties in order."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._reserved = max(1, size // 4) if size > 1 else 0
        self._in_flight = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def _can(self, priority: int) -> bool:
        return self._in_flight < (self._size if priority == 0 else self._size - self._reserved)

    async def acquire(self, priority: int) -> None:
        if self._can(priority) and (not self._waiting or priority < self._waiting[0][0]):
            self._in_flight += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # the slot came as the waiter left: hand it on
            else:
                granted.cancel()
            raise

    def release(self) -> None:
        self._in_flight -= 1
        while self._waiting and self._can(self._waiting[0][0]):
            _priority, _order, granted = heapq.heappop(self._waiting)
            if granted.done():
                continue  # its waiter left
            self._in_flight += 1
            granted.set_result(None)


def make_engine(config: RemoteVoiceConfig) -> Engine:
    from tts_server.engines.openai_speech import OpenAISpeechEngine

    engines = {"openai-speech": OpenAISpeechEngine}
    return engines[config.engine](config)
