"""Voices spoken by a remote engine (`voices.yaml` entries with `engine:`), with a local voice as
their net. A remote voice is a voice like any other to the routes, the aliases, text routing and
the cache; `TtsService` asks its engine for each piece on the event loop (not in the synthesis
pool, whose threads are for local voices), and when the engine fails, has the fallback voice say
that piece and the rest. After a failure the engine is given `RETRY_AFTER_S` before it is asked
again, so the following pieces do not each wait `timeout_ms` for it."""

from __future__ import annotations

import logging
import time

import numpy as np

from tts_server.engines import EngineError, RemoteVoiceConfig, make_engine
from tts_server.voices import Voice, VoiceInfo, VoiceSettings

log = logging.getLogger("trtc.tts")

RETRY_AFTER_S = 5.0


class RemoteVoice:
    def __init__(self, name: str, config: RemoteVoiceConfig, fallback: Voice | None) -> None:
        self.info = VoiceInfo(name, config.language, config.sample_rate, config.engine)
        self.settings = VoiceSettings(volume=config.volume, sentence_pause_s=config.sentence_pause_s)
        self.config = config
        self.fallback = fallback
        self._engine = make_engine(config)
        self._down_until = 0.0

    def synthesize(self, text: str) -> np.ndarray:
        raise RuntimeError(f"voice {self.info.name} is spoken by a remote engine: ask `audio`")

    async def audio(self, text: str, priority: int = 0) -> np.ndarray:
        """The engine's speech for one piece at `info.sample_rate`, gain applied; `EngineError`
        when it fails, or failed a moment ago."""
        if time.monotonic() < self._down_until:
            raise EngineError("recently_failed", f"the engine failed less than {RETRY_AFTER_S:g} s ago")
        try:
            samples = await self._engine.audio(text, priority)
        except EngineError as error:
            if error.reason not in ("text_refused", "busy"):  # the engine is not down
                self._down_until = time.monotonic() + RETRY_AFTER_S
            raise
        return np.clip(samples * self.config.volume, -1.0, 1.0).astype(np.float32) if self.config.volume != 1.0 else samples

    def listing(self) -> dict[str, object]:
        """What the voice lists show of it: never the key or the engine's address."""
        return {"model": self.config.model, "engine_voice": self.config.voice, "fallback": self.config.fallback}

    async def aclose(self) -> None:
        await self._engine.aclose()
