"""The response's container and codec, fed 16-bit PCM piece by piece: raw (`pcm`), WAV, MP3, Ogg
Opus, AAC (in ADTS frames) or FLAC. MP3, Opus, AAC and FLAC are encoded by FFmpeg's libmp3lame,
libopus and native AAC and FLAC encoders through PyAV, streaming:
whatever the encoder and muxer have produced after a piece goes out with that piece, so the
first bytes still leave after the first clause (an encoder holds back a few milliseconds of
audio, which comes out at the end).

Rates: MP3 takes 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100 and 48000 Hz; Opus takes
8000, 12000, 16000, 24000 and 48000 Hz; AAC the MP3 rates, 64000, 88200 and 96000 Hz. Any other
requested rate is encoded at the next higher
rate the codec takes (22050 for Opus becomes 24000, 44100 becomes 48000), which is also the rate
the response's headers then declare; players resample as they always do for Opus, whose
decoders output 48 kHz anyway.
"""

from __future__ import annotations

import io
from typing import Protocol, cast

import av
import numpy as np
from av.audio.stream import AudioStream

from tts_server.audio import wav_header

MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
CONTENT_TYPES = {
    "pcm": "audio/L16", "wav": "audio/wav", "mp3": "audio/mpeg", "ogg_opus": "audio/ogg", "aac": "audio/aac",
    "flac": "audio/flac",
}
_RATES = {"mp3": MP3_RATES, "ogg_opus": OPUS_RATES, "aac": AAC_RATES}


class Codec(Protocol):
    """One response's encoder: PCM (s16le, interleaved, at `rate`) in, the format's bytes out."""

    rate: int

    def encode(self, pcm: bytes) -> bytes: ...

    def flush(self) -> bytes:
        """What the encoder still holds, at the end of the stream."""
        ...


def encoded_rate(fmt: str, requested: int) -> int:
    """The rate the PCM must have for this format (see the module's note on rates)."""
    rates = _RATES.get(fmt)
    if rates is None:
        return requested
    return next((rate for rate in rates if rate >= requested), rates[-1])


def open_codec(fmt: str, rate: int, channels: int) -> Codec:
    if fmt == "pcm":
        return _Raw(rate, b"")
    if fmt == "wav":
        return _Raw(rate, wav_header(rate, channels))
    if fmt == "mp3":
        # Bare MP3 frames: no Xing header (it would be rewritten at the end, after its bytes left)
        # and no ID3 tag.
        return _Ffmpeg("mp3", "libmp3lame", rate, channels, 32_000 * channels if rate <= 24000 else 64_000 * channels,
                       {"write_xing": "0", "id3v2_version": "0"})
    if fmt == "ogg_opus":
        # Pages of 20 ms rather than the muxer's default second, so pages leave with each piece.
        return _Ffmpeg("ogg", "libopus", rate, channels, 32_000 * channels, {"page_duration": "20000"})
    if fmt == "aac":
        # ADTS: each frame carries its own header, so a stream plays from any frame, as it arrives.
        return _Ffmpeg("adts", "aac", rate, channels, 48_000 * channels, {})
    if fmt == "flac":
        # Raw FLAC; the header's total length stays unknown (it would be patched at the end, after
        # its bytes left), which decoders take.
        return _Ffmpeg("flac", "flac", rate, channels, 0, {})
    raise ValueError(f"unknown format {fmt!r}")


class _Raw:
    def __init__(self, rate: int, header: bytes) -> None:
        self.rate = rate
        self._header = header

    def encode(self, pcm: bytes) -> bytes:
        out, self._header = self._header + pcm, b""
        return out

    def flush(self) -> bytes:
        return self.encode(b"")


class _Sink(io.RawIOBase):
    """Where the muxer writes; drained after every piece. Not seekable, so no muxer goes back to
    patch bytes that already left."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._chunks.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out, self._chunks = b"".join(self._chunks), []
        return out


class _Ffmpeg:
    def __init__(self, container: str, codec: str, rate: int, channels: int, bit_rate: int, options: dict[str, str]) -> None:
        self.rate = rate
        self._channels = channels
        self._layout = "stereo" if channels == 2 else "mono"
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=container, options=options)
        self._stream = cast(AudioStream, self._container.add_stream(codec, rate=rate, layout=self._layout))
        if bit_rate:  # 0: a lossless codec, no target
            self._stream.codec_context.bit_rate = bit_rate
        self._pts = 0

    def encode(self, pcm: bytes) -> bytes:
        samples = np.frombuffer(pcm, dtype="<i2")
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=self._layout)
            frame.sample_rate = self.rate
            frame.pts = self._pts
            self._pts += samples.size // self._channels
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.drain()

    def flush(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.drain()
