"""MP3 and Ogg Opus through real HTTP: the protocol's content types, chunked as encoded (the
first bytes before the last piece is synthesized), decoded by ffmpeg with the right duration,
rate and channels; rates a codec does not take are encoded at the next one it does."""

from __future__ import annotations

import re
import struct
import subprocess
import time
from pathlib import Path

import httpx
import imageio_ffmpeg
import numpy as np
import pytest

from tests.conftest import TTS_KEY
from tests.support import Proxy
from tts_server.codecs import encoded_rate

PATH = "/api/v1/tts/stream"
TEXT = "Good morning. Your table for two is booked at eight tonight. I sent the details to your phone."


def _post(server: Proxy, body: dict) -> httpx.Response:
    return httpx.post(server.url + PATH, json=body, headers={"Authorization": f"Bearer {TTS_KEY}"}, timeout=60)


def _decode(path: Path) -> tuple[np.ndarray, int, int]:
    """What ffmpeg makes of a file: its samples (as decoded, int16 interleaved), rate, channels."""
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    probe = subprocess.run([ffmpeg, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    stream = re.search(r"Audio: \w+.*?, (\d+) Hz, (mono|stereo)", probe)
    assert stream, probe
    pcm = subprocess.run([ffmpeg, "-v", "error", "-i", str(path), "-f", "s16le", "-"], capture_output=True, check=True).stdout
    channels = 2 if stream.group(2) == "stereo" else 1
    return np.frombuffer(pcm, dtype="<i2"), int(stream.group(1)), channels


def _pcm_seconds(server: Proxy, rate: int, channels: int) -> float:
    response = _post(server, {"Text": TEXT, "Format": "pcm", "SampleRate": rate, "Channel": channels})
    return len(response.content) / 2 / channels / rate


@pytest.mark.parametrize(
    ("fmt", "content_type", "rate", "channels"),
    [
        ("mp3", "audio/mpeg", 16000, 1),
        ("mp3", "audio/mpeg", 44100, 2),
        ("mp3", "audio/mpeg", 8000, 1),
        ("ogg_opus", "audio/ogg", 16000, 1),
        ("ogg_opus", "audio/ogg", 48000, 2),
        ("ogg_opus", "audio/ogg", 24000, 1),
    ],
)
def test_each_format_decodes_to_the_speech_it_carries(
    tts: Proxy, tmp_path: Path, fmt: str, content_type: str, rate: int, channels: int
) -> None:
    response = _post(tts, {"Text": TEXT, "Format": fmt, "SampleRate": rate, "Channel": channels})
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["transfer-encoding"] == "chunked" and "content-length" not in response.headers
    path = tmp_path / f"speech.{fmt}"
    path.write_bytes(response.content)
    samples, decoded_rate, decoded_channels = _decode(path)
    assert decoded_channels == channels
    if fmt == "mp3":
        assert decoded_rate == rate
    else:
        # Opus always decodes at 48 kHz; the rate it was encoded from is in its OpusHead.
        assert decoded_rate == 48000 and _opus_input_rate(response.content) == rate
    seconds = len(samples) / channels / decoded_rate
    expected = _pcm_seconds(tts, rate, channels)
    # The same words (the test servers' piper has no random timing), plus the encoder's delay and
    # padding, which bare frames do not let a decoder trim: about 0.2 s at 8 kHz (72 ms MP3 frames).
    assert abs(seconds - expected) < 0.02 * expected + 0.25, (seconds, expected)
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 300  # speech, not silence


@pytest.mark.parametrize(("fmt", "asked", "encoded"), [("ogg_opus", 22050, 24000), ("ogg_opus", 44100, 48000),
                                                      ("ogg_opus", 11025, 12000), ("mp3", 9000, 11025)])
def test_a_rate_the_codec_does_not_take_is_encoded_at_the_next_one(
    tts: Proxy, tmp_path: Path, fmt: str, asked: int, encoded: int
) -> None:
    assert encoded_rate(fmt, asked) == encoded
    response = _post(tts, {"Text": "Hello there.", "Format": fmt, "SampleRate": asked})
    assert response.status_code == 200
    if fmt == "ogg_opus":
        assert _opus_input_rate(response.content) == encoded
    else:
        path = tmp_path / "speech.mp3"
        path.write_bytes(response.content)
        assert _decode(path)[1] == encoded


@pytest.mark.parametrize(("fmt", "magic"), [("mp3", b"\xff"), ("ogg_opus", b"OggS")])
def test_the_first_bytes_come_while_later_pieces_are_still_synthesized(tts: Proxy, fmt: str, magic: bytes) -> None:
    """Several pieces: bytes arrive in more than one chunk, the first one a valid start of the
    format (MP3 frame sync, Ogg page), well before the last."""
    text = " ".join(f"This is sentence number {n} of a long answer that takes a while to say." for n in range(6))
    chunks: list[tuple[float, bytes]] = []
    started = time.perf_counter()
    with httpx.stream("POST", tts.url + PATH, json={"Text": text, "Format": fmt}, headers={"Authorization": f"Bearer {TTS_KEY}"},
                      timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            chunks.append((time.perf_counter() - started, chunk))
    assert len(chunks) >= 3
    assert chunks[0][1].startswith(magic)
    assert chunks[0][0] < chunks[-1][0] / 2


def test_nothing_speakable_is_a_moment_of_silence_in_the_format(tts: Proxy, tmp_path: Path) -> None:
    for fmt in ("mp3", "ogg_opus"):
        response = _post(tts, {"Text": "😀👍", "Format": fmt})
        assert response.status_code == 200
        path = tmp_path / f"silence.{fmt}"
        path.write_bytes(response.content)
        samples, rate, _channels = _decode(path)
        assert 0.1 < len(samples) / rate < 0.5 and np.abs(samples).max() < 50


def _opus_input_rate(ogg: bytes) -> int:
    """The input sample rate recorded in the stream's OpusHead packet (RFC 7845, 5.1)."""
    head = ogg.index(b"OpusHead")
    return struct.unpack_from("<I", ogg, head + 12)[0]
