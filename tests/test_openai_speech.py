"""OpenAI's speech API (`openai_speech/`) through real HTTP with the official `openai` client, on
the TTS server alone (`serve --only tts`): every format decoded by PyAV for its duration, rate and
channels; speed as duration over speed; streamed as synthesized; SSE events; voices and aliases; errors
in OpenAI's shape. Also `?speed=` and `?volume=` on the TRTC route, and the docs' snippet."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest

from tests.conftest import TTS_KEY
from tests.support import Proxy

TEXT = "Good morning. Your table for two is booked at eight tonight. I sent the details to your phone."
DOCS = Path(__file__).resolve().parents[1] / "docs" / "tts-and-voices.md"


def _client(server: Proxy, key: str = TTS_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=60, max_retries=0)


def _decoded(data: bytes) -> tuple[np.ndarray, int, int]:
    """What PyAV (FFmpeg) makes of a file: mono float samples, the rate, the channels."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [frame.to_ndarray() for frame in container.decode(stream)]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
    samples = np.concatenate([f.reshape(channels, -1) if f.shape[0] == channels else f.reshape(-1, channels).T for f in frames], axis=1)
    return samples[0].astype(np.float64), rate, channels


def _pcm_seconds(data: bytes) -> float:
    return len(data) / 2 / 24_000


@pytest.fixture(scope="module")
def pcm_reference(tts: Proxy) -> bytes:
    return _client(tts).audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="pcm").content


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("mp3", "audio/mpeg"), ("opus", "audio/opus"), ("aac", "audio/aac"), ("flac", "audio/flac"), ("wav", "audio/wav")],
)
def test_every_format_decodes_to_the_speech_it_carries(tts: Proxy, pcm_reference: bytes, fmt: str, content_type: str) -> None:
    response = _client(tts).audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format=fmt)
    assert response.response.headers["content-type"] == content_type
    assert response.response.headers.get("transfer-encoding") == "chunked"
    samples, rate, channels = _decoded(response.content)
    if fmt == "opus":
        # Opus decodes at 48 kHz whatever it was encoded from; its OpusHead records 24 kHz.
        head = response.content.index(b"OpusHead")
        assert int.from_bytes(response.content[head + 12:head + 16], "little") == 24_000 and rate == 48_000
    else:
        assert rate == 24_000
    assert channels == 1
    # The same speech as the raw PCM (the encoders add at most a few tens of ms of padding).
    assert abs(len(samples) / rate - _pcm_seconds(pcm_reference)) < 0.15
    assert np.sqrt(np.mean(samples**2)) > 0.02  # speech, not silence


def test_pcm_is_raw_24khz_16bit_little_endian_mono(tts: Proxy, pcm_reference: bytes) -> None:
    """OpenAI's `pcm`: no header, 24 kHz, 16-bit little-endian, one channel."""
    assert not pcm_reference.startswith(b"RIFF") and len(pcm_reference) % 2 == 0
    samples = np.frombuffer(pcm_reference, dtype="<i2").astype(np.float64) / 32768
    assert 4.0 < _pcm_seconds(pcm_reference) < 9.0
    # Read as little-endian the speech is smooth; byte-swapped it would be noise.
    swapped = np.frombuffer(pcm_reference, dtype=">i2").astype(np.float64) / 32768
    assert np.mean(np.abs(np.diff(samples))) < np.mean(np.abs(np.diff(swapped))) / 3


def test_mp3_is_the_default_and_speed_is_duration_over_speed(tts: Proxy, pcm_reference: bytes) -> None:
    client = _client(tts)
    default = client.audio.speech.create(model="gpt-4o-mini-tts", voice="nova", input=TEXT,
                                         instructions="Speak like a pirate.")  # instructions: accepted, ignored
    assert default.response.headers["content-type"] == "audio/mpeg"
    # As OpenAI's API means it, over the whole range: the duration is the normal one over `speed`.
    for speed in (0.25, 0.5, 2.0, 4.0):
        audio = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="pcm", speed=speed)
        ratio = _pcm_seconds(audio.content) / _pcm_seconds(pcm_reference)
        assert abs(ratio * speed - 1) < 0.1, (speed, ratio)
        if speed == 2.0:
            # Stretched in time, not resampled: the voice's pitch stays, so the dominant frequency
            # of the sped-up speech is not twice the original's.
            assert _pitch(audio.content) < 1.5 * _pitch(pcm_reference)


def _pitch(pcm: bytes) -> float:
    """The median dominant frequency (80-400 Hz) over 40 ms frames of voiced audio."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    size = 960
    peaks = []
    for start in range(0, len(samples) - size, size):
        frame = samples[start:start + size]
        if np.sqrt(np.mean(frame**2)) < 1000:
            continue
        spectrum = np.abs(np.fft.rfft(frame * np.hanning(size)))
        freqs = np.fft.rfftfreq(size, 1 / 24_000)
        band = (freqs > 80) & (freqs < 400)
        peaks.append(freqs[band][np.argmax(spectrum[band])])
    return float(np.median(peaks))


def test_audio_streams_as_it_is_synthesized(tts: Proxy) -> None:
    long_text = " ".join([TEXT] * 4)
    started = time.perf_counter()
    arrivals = []
    with _client(tts).audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=long_text, response_format="pcm"
    ) as response:
        for chunk in response.iter_bytes():
            if chunk:
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) > 3
    # The first audio leaves long before the last: the pieces are sent as each is synthesized.
    assert arrivals[0] < arrivals[-1] / 3


def test_sse_sends_base64_audio_deltas_then_done(tts: Proxy) -> None:
    text = TEXT + " Is there anything else?"
    client = _client(tts)
    response = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input=text, response_format="pcm",
                                          stream_format="sse")
    assert response.response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) > 2
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["input_tokens"] > 0
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    # The same bytes as the audio stream (which the phrase cache now answers with them).
    assert audio == client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="pcm").content


def test_voices_names_and_aliases(start_tts, tmp_path: Path) -> None:
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    (voices_dir / "voices.yaml").write_text("aliases:\n  nova: espeak-cmn\n  receptionist: en_US-joe-medium\n")
    server = start_tts({"VOICES_DIR": str(voices_dir), "TTS_ESPEAK_FALLBACK": "true"})
    client = _client(server)
    for voice, chinese in (("nova", True), ("receptionist", False), ("alloy", False), ("en_US-joe-medium", False)):
        text = "你好，欢迎光临。" if chinese else "Welcome."
        response = client.audio.speech.create(model="tts-1", voice=voice, input=text, response_format="wav")
        assert response.response.headers["x-tts-voice"] == ("espeak-cmn" if chinese else "en_US-joe-medium")
    # OpenAI's custom-voice object names a voice by id.
    response = client.audio.speech.create(model="tts-1", voice={"id": "receptionist"}, input="Hi.", response_format="wav")
    assert response.response.headers["x-tts-voice"] == "en_US-joe-medium"
    listed = httpx.get(server.url + "/v1/audio/voices", headers={"Authorization": f"Bearer {TTS_KEY}"}).json()
    by_name = {v["name"]: v for v in listed["voices"]}
    assert listed["default"] == "en_US-joe-medium"
    assert {"alloy", "receptionist", "shimmer"} <= set(by_name["en_US-joe-medium"]["aliases"])
    assert by_name["en_US-joe-medium"]["language"] == "en_US"
    assert by_name["espeak-cmn"]["aliases"] == ["nova"] and by_name["espeak-cmn"]["language"] == "zh_CN"


@pytest.mark.parametrize(
    ("change", "status", "param", "says"),
    [
        ({"voice": "no-such-voice"}, 400, "voice", "no-such-voice"),
        ({"voice": ""}, 400, "voice", "voice name"),
        ({"voice": {"name": "alloy"}}, 400, "voice", "voice name"),
        ({"input": ""}, 400, "input", "input"),
        ({"input": "x" * 5000}, 400, "input", "characters"),
        ({"response_format": "ogg"}, 400, "response_format", "response_format"),
        ({"speed": 5}, 400, "speed", "0.25"),
        ({"speed": "fast"}, 400, "speed", "speed"),
        ({"stream_format": "ws"}, 400, "stream_format", "stream_format"),
    ],
)
def test_bad_requests_get_openais_error_shape(tts: Proxy, change: dict, status: int, param: str, says: str) -> None:
    body = {"model": "tts-1", "voice": "alloy", "input": "Hello.", **change}
    response = httpx.post(tts.url + "/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {TTS_KEY}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and says in error["message"]


def test_an_enormous_voice_name_is_not_echoed_whole(tts: Proxy) -> None:
    body = {"model": "tts-1", "voice": "v" * 100_000, "input": "Hello."}
    response = httpx.post(tts.url + "/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {TTS_KEY}"})
    assert response.status_code == 400 and len(response.content) < 2000


def test_the_client_sees_openais_errors(tts: Proxy) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(tts, key="wrong").audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as bad:
        _client(tts).audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
    assert bad.value.param == "voice" and "nobody" in bad.value.message
    not_json = httpx.post(tts.url + "/v1/audio/speech", content=b"{", headers={"Authorization": f"Bearer {TTS_KEY}"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"


def test_the_trtc_route_takes_speed_and_volume_in_its_url(tts: Proxy) -> None:
    def pcm(query: str) -> np.ndarray:
        response = httpx.post(tts.url + "/api/v1/tts/stream" + query, json={"Text": TEXT, "Format": "pcm", "SampleRate": 16000},
                              headers={"Authorization": f"Bearer {TTS_KEY}"}, timeout=60)
        assert response.status_code == 200, response.text
        return np.frombuffer(response.content, dtype="<i2").astype(np.float64)

    plain, fastest, slowest, quiet = pcm(""), pcm("?speed=4"), pcm("?speed=0.25"), pcm("?volume=0.5&voice=alloy")
    assert abs(len(fastest) / len(plain) * 4 - 1) < 0.1 and abs(len(slowest) / len(plain) / 4 - 1) < 0.1
    assert len(quiet) == len(plain)
    assert 0.45 < np.sqrt(np.mean(quiet**2)) / np.sqrt(np.mean(plain**2)) < 0.55
    for query, code in (("?speed=0", "INVALID_SPEED"), ("?speed=abc", "INVALID_SPEED"), ("?volume=9", "INVALID_VOLUME"),
                        ("?speed=nan", "INVALID_SPEED")):
        response = httpx.post(tts.url + "/api/v1/tts/stream" + query, json={"Text": "Hi."},
                              headers={"Authorization": f"Bearer {TTS_KEY}"})
        assert response.status_code == 400 and response.json()["error"]["code"] == code


def _readme_snippet(name: str) -> str:
    found = re.search(rf"<!-- {name} -->\s*```python\n(.*?)```", DOCS.read_text(), re.S)
    assert found, f"docs/tts-and-voices.md has no {name} snippet"
    return found.group(1)


def test_the_readmes_openai_sdk_snippet_speaks(tts: Proxy, tmp_path: Path) -> None:
    snippet = _readme_snippet("openai-speech-sdk")
    assert "http://127.0.0.1:8000/v1" in snippet and "YOUR_TTS_KEY" in snippet
    script = snippet.replace("http://127.0.0.1:8000/v1", tts.url + "/v1").replace("YOUR_TTS_KEY", TTS_KEY)
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=120)
    samples, rate, channels = _decoded((tmp_path / "hello.mp3").read_bytes())
    assert (rate, channels) == (24_000, 1) and len(samples) / rate > 0.5
