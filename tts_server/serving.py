"""One TTS request from text to streamed audio.

`TtsService.open` does everything that can still fail with a proper HTTP error: check the text,
pick the voices, get admitted to the synthesis pool (or 503) and synthesize the first piece (or
500). The response then streams that piece and the rest, each synthesized while the previous one
is sent; a client that goes away withdraws the next piece at once.

A piece of a remote voice (`remote.RemoteVoice`) is asked of its engine on the event loop, up to
`_LOOKAHEAD` pieces ahead of the one being sent (the engine's own `max_concurrency` bounds the
requests), and only its encoding runs in a thread; when the engine fails, the voice's local
fallback says the piece in the synthesis pool, and the stream goes on in one piece.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Hashable

import numpy as np

from core.metrics import TTS_ENGINE_FALLBACKS, TTS_FIRST_AUDIO, TTS_PIECES, TTS_STREAMS
from core.settings import Settings
from tts_server import text as text_rules
from tts_server.audio import PcmEncoder, silence, stretch
from tts_server.codecs import CONTENT_TYPES, encoded_rate, open_codec
from tts_server.cache import AudioCache
from tts_server.pool import Job, SynthesisPool
from tts_server.protocol import TtsError
from tts_server.verbalize import Lang, Verbalizer, lang_for
from tts_server.engines import EngineError
from tts_server.remote import RemoteVoice
from tts_server.voices import Voice, VoiceRegistry, VoiceSettings

log = logging.getLogger("trtc.tts")

# What a text with nothing speakable in it gets.
SILENCE_S = 0.2
# Pieces of a remote voice asked of its engine ahead of the one being sent.
_LOOKAHEAD = 2


@dataclass(frozen=True)
class Piece:
    text: str
    voice: Voice
    # The grammar that writes its numbers, prices, dates... out as said (`verbalize`); None: as written.
    lang: Lang | None = None


@dataclass(frozen=True)
class Utterance:
    """What one request asks to hear, whichever route it came by: the text, how to encode it, and
    how fast and loud to speak it (on top of the voice's `voices.yaml` settings)."""

    text: str
    format: str
    sample_rate: int
    channels: int = 1
    speed: float = 1.0
    volume: float = 1.0

    @property
    def rate(self) -> int:
        """The rate the audio is encoded at: the requested one, or for MP3, Opus and AAC the next
        the codec takes (`codecs.encoded_rate`)."""
        return encoded_rate(self.format, self.sample_rate)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass(frozen=True)
class Speech:
    # The voices that speak it, in order of first use (the `X-TTS-Voice` header).
    voices: list[str]
    audio: AsyncIterator[bytes]


class SynthesisCost:
    """Seconds of synthesis per character of text, learnt from every piece (a moving average):
    what a piece is expected to take, for the pool's deadlines."""

    def __init__(self, seconds_per_char: float = 0.003) -> None:
        self.seconds_per_char = seconds_per_char

    def estimate(self, text: str) -> float:
        return self.seconds_per_char * len(text)

    def learn(self, text: str, seconds: float) -> None:
        if text:
            # A float store is atomic: the pool's threads may learn at once.
            self.seconds_per_char += 0.2 * (seconds / len(text) - self.seconds_per_char)


class _Renderer:
    """Synthesizes and encodes one stream's pieces in order (in the pool's threads, one at a
    time), keeping one resampler per voice rate so the audio stays continuous across pieces."""

    def __init__(self, request: Utterance, verbalizer: Verbalizer | None, cost: SynthesisCost) -> None:
        self._request = request
        self._verbalizer = verbalizer
        self._cost = cost
        # Seconds of audio rendered so far: how long what was sent takes to play.
        self.seconds = 0.0
        # A remote voice's fallback spoke some of it: not what the voice sounds like, not cached.
        self.degraded = False
        self._encoder: PcmEncoder | None = None
        self._source_rate = 0
        self._codec = open_codec(request.format, request.rate, request.channels)

    def render(self, piece: Piece, *, last: bool) -> bytes:
        """A local voice's piece: synthesized and encoded (in a synthesis thread)."""
        started = time.perf_counter()
        samples = piece.voice.synthesize(spoken_text(piece, self._verbalizer))
        self._cost.learn(piece.text, time.perf_counter() - started)
        return self.encode(samples, piece.voice.info.sample_rate, piece.voice.settings, last=last)

    def encode(self, samples: np.ndarray, rate: int, settings: VoiceSettings, *, last: bool) -> bytes:
        """A piece's samples (at `rate`) at the request's speed and volume, encoded, in order after
        the pieces before it."""
        samples = stretch(samples, rate, self._request.speed)
        if self._request.volume != 1.0:
            samples = np.clip(samples * self._request.volume, -1.0, 1.0).astype(np.float32)
        if not len(samples):
            # The voice made nothing of it (a sign it cannot read): a pause, never a piece of no audio.
            samples = np.zeros(round(SILENCE_S * rate), dtype=np.float32)
        pause = settings.sentence_pause_s / self._request.speed
        if pause and not last:
            samples = np.concatenate([samples, np.zeros(round(pause * rate), dtype=np.float32)])
        self.seconds += len(samples) / rate
        TTS_PIECES.inc()
        out = b""
        if rate != self._source_rate:
            if self._encoder is not None:
                out += self._encoder.flush()
            self._source_rate = rate
            self._encoder = PcmEncoder(self._source_rate, self._codec.rate, self._request.channels)
        assert self._encoder is not None
        out += self._encoder.encode(samples)
        if last:
            out += self._encoder.flush()
        encoded = self._codec.encode(out)
        return encoded + self._codec.flush() if last else encoded

    def finish(self) -> bytes:
        """What ends the stream cleanly after a piece that never came (the encoder's and the
        codec's last bytes)."""
        out = self._encoder.flush() if self._encoder is not None else b""
        return self._codec.encode(out) + self._codec.flush()

    def silence(self, seconds: float) -> bytes:
        """The whole stream as a moment of silence (a text with nothing speakable in it)."""
        return self._codec.encode(silence(self._codec.rate, self._request.channels, seconds)) + self._codec.flush()


def spoken_text(piece: Piece, verbalizer: Verbalizer | None) -> str:
    """What the voice is given for a piece. Runs in a synthesis thread: the grammars take a few ms."""
    if verbalizer is None or piece.lang is None:
        return piece.text
    return verbalizer(piece.text, piece.lang)


class TtsService:
    def __init__(
        self, settings: Settings, voices: VoiceRegistry, pool: SynthesisPool, verbalizer: Verbalizer | None = None
    ) -> None:
        self.settings = settings
        self.voices = voices
        self.pool = pool
        self.verbalizer = verbalizer
        self.cost = SynthesisCost()
        self.cache = AudioCache(settings.tts_cache_mb * 1024 * 1024)
        self._key_voices = settings.tts_key_voice_map

    def choose_voice(self, requested: str | None, api_key: str | None) -> Voice:
        """The voice asked for (by name or alias), else the key's (`TTS_KEY_VOICES`), else the default."""
        name = requested or self._key_voices.get(api_key or "") or self.voices.default
        voice = self.voices.get(name)
        if voice is None:
            names = [info.name for info in self.voices.infos]
            listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise TtsError(400, "UNKNOWN_VOICE", f"No voice {name[:80]!r}; installed: {listed}.")
        return voice

    def plan(self, request: Utterance, voice: Voice) -> list[Piece]:
        """The text as pieces, each with a voice that speaks its language."""
        if len(request.text) > self.settings.tts_max_text_chars:
            raise TtsError(
                413, "TEXT_TOO_LONG",
                f"Text has {len(request.text)} characters; this server takes at most {self.settings.tts_max_text_chars}.",
            )
        planned = []
        for piece in text_rules.pieces(request.text):
            family = text_rules.language(piece)
            speaker = self.voices.for_language(voice, family) if text_rules.readable(piece) else None
            if speaker is None:
                what = f"language {family!r}" if family else "the script of"
                raise TtsError(
                    400, "UNSUPPORTED_LANGUAGE",
                    f"No installed voice speaks {what} the text {piece[:30]!r}; add a piper voice for it to "
                    "VOICES_DIR, or turn on TTS_ESPEAK_FALLBACK.",
                )
            planned.append(Piece(piece, speaker, lang_for(family, speaker.info.language)))
        return planned

    async def open(self, request: Utterance, voice: Voice) -> Speech:
        started = time.perf_counter()
        pieces = self.plan(request, voice)
        voices = list(dict.fromkeys(piece.voice.info.name for piece in pieces)) or [voice.info.name]
        key: Hashable = (voice.info.name, request)
        cached = self.cache.get(key)
        if cached is not None:
            TTS_STREAMS.labels("cached").inc()
            TTS_FIRST_AUDIO.observe(time.perf_counter() - started)
            return Speech(voices, _once(cached))
        renderer = _Renderer(request, self.verbalizer, self.cost)
        if not pieces:
            # Only emoji, a URL, markup: a moment of silence, never a 200 without audio.
            TTS_STREAMS.labels("empty").inc()
            return Speech(voices, _once(renderer.silence(SILENCE_S)))
        ahead = _Ahead(pieces, self.verbalizer)
        try:
            first = await self._first_piece(renderer, pieces, ahead)
        except BaseException:
            ahead.cancel()
            raise
        TTS_FIRST_AUDIO.observe(time.perf_counter() - started)
        return Speech(voices, self._stream(renderer, pieces, first, key, ahead))

    async def _first_piece(self, renderer: _Renderer, pieces: list[Piece], ahead: _Ahead) -> bytes:
        deadline = time.monotonic() + self.settings.tts_first_audio_target_s - self.cost.estimate(pieces[0].text)
        job = self._submit(renderer, pieces, 0, deadline, ahead)
        try:
            await asyncio.wait_for(job.started.wait(), self.settings.tts_queue_timeout_s)
        except TimeoutError:
            if self._withdraw(job):
                TTS_STREAMS.labels("busy").inc()
                raise TtsError(
                    503, "SERVER_BUSY",
                    f"All {self.settings.tts_workers} synthesis workers stayed busy for "
                    f"{self.settings.tts_queue_timeout_s:g} s; try again shortly.",
                ) from None
        except asyncio.CancelledError:
            self._withdraw(job)
            raise
        try:
            return await job.result
        except EngineError as exc:
            TTS_STREAMS.labels("failed").inc()
            raise TtsError(502, "ENGINE_FAILURE", f"The voice's engine failed ({exc.reason}) and it has no fallback voice.") from exc
        except Exception as exc:
            TTS_STREAMS.labels("failed").inc()
            log.exception("synthesis failed", exc_info=exc)
            raise TtsError(500, "ENGINE_FAILURE", "Speech synthesis failed; the server log has the details.") from exc

    async def _stream(
        self, renderer: _Renderer, pieces: list[Piece], first: bytes, key: Hashable, ahead: _Ahead
    ) -> AsyncIterator[bytes]:
        sent: list[bytes] = [first]
        job: Job | _TaskJob | None = None
        outcome = "cancelled"
        # When the first audio went out: the client's playback clock starts about then.
        playing_since = time.monotonic()
        try:
            if len(pieces) > 1:
                job = self._submit(renderer, pieces, 1, self._due(renderer, pieces, 1, playing_since), ahead)
            yield first
            for index in range(1, len(pieces)):
                assert job is not None
                audio = await job.result
                following = index + 1
                job = (self._submit(renderer, pieces, following, self._due(renderer, pieces, following, playing_since), ahead)
                       if following < len(pieces) else None)
                sent.append(audio)
                yield audio
            outcome = "completed"
            if not renderer.degraded:
                self.cache.put(key, b"".join(sent))
        except Exception:
            outcome = "failed"
            log.exception("synthesis failed mid-stream; the stream ends early")
            try:
                ending = renderer.finish()
            except Exception:  # the encoder broke with the piece: nothing more can be said
                ending = b""
            if ending:
                yield ending
        finally:
            if job is not None:
                self._withdraw(job)
            ahead.cancel()
            TTS_STREAMS.labels(outcome).inc()
            if outcome == "cancelled":
                log.info("client left; synthesis stopped after %d of %d pieces", len(sent), len(pieces))

    def _due(self, renderer: _Renderer, pieces: list[Piece], index: int, playing_since: float) -> float:
        """When a piece must start to be in time: when the audio rendered so far (all of it sent,
        or about to be) has played out, less its expected synthesis time."""
        return playing_since + renderer.seconds - self.cost.estimate(pieces[index].text)

    def _submit(self, renderer: _Renderer, pieces: list[Piece], index: int, deadline: float, ahead: _Ahead) -> Job | _TaskJob:
        last = index == len(pieces) - 1
        if isinstance(pieces[index].voice, RemoteVoice):
            return _TaskJob(asyncio.create_task(self._remote_piece(renderer, pieces, index, deadline, ahead)))
        return self.pool.submit(lambda: renderer.render(pieces[index], last=last), deadline)

    def _withdraw(self, job: Job | _TaskJob) -> bool:
        if isinstance(job, _TaskJob):
            job.result.cancel()
            return True
        return self.pool.withdraw(job)

    async def _remote_piece(self, renderer: _Renderer, pieces: list[Piece], index: int, deadline: float,
                            ahead: _Ahead) -> bytes:
        """A remote voice's piece: its engine's audio, or when the engine fails, its fallback's
        (in the synthesis pool), encoded in a thread."""
        piece = pieces[index]
        voice = piece.voice
        assert isinstance(voice, RemoteVoice)
        try:
            samples = await ahead.audio(index)
            rate, settings = voice.info.sample_rate, voice.settings
        except EngineError as error:
            TTS_ENGINE_FALLBACKS.labels(voice.config.engine, error.reason).inc()
            if voice.fallback is None:
                log.error("voice %s: its engine failed (%s: %s) and it has no fallback", voice.info.name, error.reason, error)
                raise
            log.warning("voice %s: its engine failed (%s: %s); %s says the rest", voice.info.name, error.reason, error,
                        voice.fallback.info.name)
            renderer.degraded = True
            fallback = voice.fallback
            said = await asyncio.to_thread(spoken_text, piece, self.verbalizer)
            samples = await self.pool.submit(lambda: fallback.synthesize(said), deadline).result
            rate, settings = fallback.info.sample_rate, fallback.settings
        return await asyncio.to_thread(renderer.encode, samples, rate, settings, last=index == len(pieces) - 1)


class _TaskJob:
    """A remote piece's work, shaped as a pool job: admitted at once, its result a task."""

    def __init__(self, task: asyncio.Task[bytes]) -> None:
        self.result = task
        self.started = asyncio.Event()
        self.started.set()


class _Ahead:
    """A stream's remote pieces, asked of their engines up to `_LOOKAHEAD` ahead of the one
    being rendered, in order (the engine's slots are taken first come, first served)."""

    def __init__(self, pieces: list[Piece], verbalizer: Verbalizer | None) -> None:
        self._pieces = pieces
        self._verbalizer = verbalizer
        self._asked: dict[int, asyncio.Task[np.ndarray]] = {}

    def audio(self, index: int) -> asyncio.Task[np.ndarray]:
        for ask in range(index, min(len(self._pieces), index + _LOOKAHEAD + 1)):
            if ask not in self._asked and isinstance(self._pieces[ask].voice, RemoteVoice):
                self._asked[ask] = asyncio.create_task(self._ask(self._pieces[ask], ask))
        return self._asked.pop(index)

    async def _ask(self, piece: Piece, index: int) -> np.ndarray:
        voice = piece.voice
        assert isinstance(voice, RemoteVoice)
        return await voice.audio(await asyncio.to_thread(spoken_text, piece, self._verbalizer), priority=index)

    def cancel(self) -> None:
        for task in self._asked.values():
            if task.done() and not task.cancelled():
                task.exception()  # asked ahead for a stream that ended: its failure is no one's
            task.cancel()
        self._asked.clear()


async def _once(audio: bytes) -> AsyncIterator[bytes]:
    yield audio
