"""From the voice's samples to the bytes the orchestrator asked for: stretched in time for a speed
other than 1 (`stretch`), resampled with soxr's streaming resampler (its state carries across pieces, so there are no clicks at the seams),
16-bit signed little-endian, mono duplicated into both channels for stereo, and for WAV one
streaming RIFF header in front.
"""

from __future__ import annotations

import struct

import numpy as np
import pedalboard
import soxr

# Streaming WAV marks both sizes unknown: the length is not known when the header goes out.
_UNKNOWN_SIZE = 0xFFFFFFFF


def stretch(samples: np.ndarray, rate: int, speed: float) -> np.ndarray:
    """`samples` played `speed` times as fast, the pitch kept: Rubber Band's finer (R3) engine,
    one piece at a time. The voices speak at their own pace and this alone sets the speed: piper's
    length scale rounds every phoneme to whole frames, so 2x through it came out at 0.63 of the
    time and 4x at 0.48; stretched, the duration is 1/speed of it to within a few samples."""
    if speed == 1.0 or not len(samples):
        return samples
    stretched = pedalboard.time_stretch(samples[np.newaxis, :], float(rate), stretch_factor=speed)
    return np.ascontiguousarray(stretched[0], dtype=np.float32)


def wav_header(sample_rate: int, channels: int) -> bytes:
    """A canonical 44-byte PCM WAV header for a stream of unknown length."""
    block_align = channels * 2
    return b"".join(
        [
            b"RIFF",
            struct.pack("<I", _UNKNOWN_SIZE),
            b"WAVE",
            b"fmt ",
            struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, 16),
            b"data",
            struct.pack("<I", _UNKNOWN_SIZE),
        ]
    )


class PcmEncoder:
    """Float samples at the voice's rate in, interleaved s16le bytes at the requested rate out.
    One encoder per response: the resampler keeps state between pieces."""

    def __init__(self, source_rate: int, target_rate: int, channels: int) -> None:
        self._channels = channels
        self._resampler = (
            soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32", quality="HQ")
            if source_rate != target_rate
            else None
        )

    def encode(self, samples: np.ndarray, *, last: bool = False) -> bytes:
        mono = samples.astype(np.float32, copy=False).reshape(-1)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        pcm = (np.clip(mono, -1.0, 1.0) * 32767.0).astype("<i2")
        if self._channels == 2:
            pcm = np.repeat(pcm, 2)
        return pcm.tobytes()

    def flush(self) -> bytes:
        """The resampler's last samples, at the end of the stream."""
        if self._resampler is None:
            return b""
        return self.encode(np.zeros(0, dtype=np.float32), last=True)


def silence(sample_rate: int, channels: int, seconds: float) -> bytes:
    """16-bit PCM silence: what a text with nothing speakable in it gets, so the orchestrator
    always receives audio and its conversation goes on."""
    return bytes(int(sample_rate * seconds) * channels * 2)
