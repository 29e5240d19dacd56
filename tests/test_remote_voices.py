"""Remote voices (`tts_server/remote.py`, `tts_server/engines/`): a TTS server whose voices.yaml
names remote engines, each a real server in another process: the fake upstream's scripted engine
(a known sine, or failing, hanging, dying mid-stream, sending too much) and this project's own
speech API. Rate, duration and pitch are checked after resampling; every failure ends in audio
from the fallback voice, or the protocol's JSON error, or a clean end."""

from __future__ import annotations

import io
import re
import time
import wave
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import TTS_KEY
from tests.support import Proxy, Upstream

PATH = "/api/v1/tts/stream"
FALLBACK = "en_US-joe-medium"


def _voices(upstream: Upstream, ours: Proxy) -> str:
    url = upstream.base_url

    def voice(name: str, model: str, extra: str = "", fallback: str | None = FALLBACK) -> str:
        net = f", fallback: {fallback}" if fallback else ""
        return f"  {name}: {{engine: openai-speech, base_url: '{url}', model: '{model}', timeout_ms: 1000{net}{extra}}}\n"

    return "voices:\n" + "".join([
        voice("sine", "e[[hz:440]]"),
        voice("sine-wav", "e[[hz:300]][[rate:16000]]", ", response_format: wav, sample_rate: 16000"),
        voice("refusing", "e[[status:503]]"),
        voice("refusing-bare", "e[[status:503]]", fallback=None),
        voice("hanging", "e[[first_delay:30]]", ", timeout_ms: 300"),
        voice("dying", "e[[die_after:2]]"),
        voice("dying-bare", "e[[die_after:2]]", fallback=None),
        voice("endless", "e[[endless:1]]"),
        f"  ours: {{engine: openai-speech, base_url: '{ours.url}/v1', api_key: '${{OUR_TTS_KEY}}', model: tts-1, "
        f"voice: {FALLBACK}, sample_rate: 24000, fallback: {FALLBACK}}}\n",
    ]) + "aliases:\n  cosy: sine\n"


@pytest.fixture(scope="module")
def remote(upstream: Upstream, tts: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    folder = tmp_path_factory.mktemp("remote-voices")
    (folder / "voices.yaml").write_text(_voices(upstream, tts))
    server = Proxy(folder / "server", {"TTS_API_KEYS": TTS_KEY, "VOICES_DIR": str(folder), "OUR_TTS_KEY": TTS_KEY})
    server.start("--only", "tts")
    yield server
    server.stop()


def _speak(server: Proxy, voice: str, text: str, fmt: str = "pcm", rate: int = 16000) -> httpx.Response:
    return httpx.post(server.url + PATH, params={"voice": voice}, timeout=60,
                      json={"Text": text, "AudioFormat": fmt, "SampleRate": rate},
                      headers={"Authorization": f"Bearer {TTS_KEY}", "X-Task-Id": "t", "X-Request-Id": "r"})


def _samples(response: httpx.Response) -> np.ndarray:
    raw = response.content
    if response.headers["content-type"] == "audio/wav":
        with wave.open(io.BytesIO(raw)) as reader:
            raw = reader.readframes(1 << 30)
    return np.frombuffer(raw, dtype="<i2").astype(np.float64)


def _pitch(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def _fallbacks(server: Proxy, reason: str) -> float:
    found = re.search(rf'trtc_tts_engine_fallbacks_total{{engine="openai-speech",reason="{reason}"}} ([0-9.]+)',
                      httpx.get(server.url + "/metrics").text)
    return float(found.group(1)) if found else 0.0


def test_a_remote_engines_audio_is_resampled_keeping_duration_and_pitch(remote: Proxy) -> None:
    text = "Hello there. This is a remote voice."
    response = _speak(remote, "cosy", text)  # by its alias
    assert response.status_code == 200 and response.headers["x-tts-voice"] == "sine"
    samples = _samples(response)
    # The engine says 0.05 s a character (at least 0.2 s) of each piece the text is cut into.
    assert 0.05 * len(text) * 0.8 < len(samples) / 16000 < 0.05 * len(text) * 1.3
    assert abs(_pitch(samples, 16000) - 440) < 5
    wav = _speak(remote, "sine-wav", "A WAV engine at sixteen kilohertz.", fmt="wav", rate=24000)
    assert wav.status_code == 200 and abs(_pitch(_samples(wav), 24000) - 300) < 5


def test_remote_voices_are_listed_without_their_keys(remote: Proxy) -> None:
    listed = httpx.get(remote.url + "/api/v1/tts/voices", headers={"Authorization": f"Bearer {TTS_KEY}"}).json()
    sine = next(v for v in listed["voices"] if v["name"] == "sine")
    assert sine["engine"] == "openai-speech" and sine["model"] == "e[[hz:440]]" and sine["fallback"] == FALLBACK
    assert "cosy" in sine["aliases"]
    openai = httpx.get(remote.url + "/v1/audio/voices", headers={"Authorization": f"Bearer {TTS_KEY}"}).text
    for text in (str(listed), openai):
        assert TTS_KEY not in text and "base_url" not in text and "127.0.0.1" not in text


def test_this_projects_own_speech_api_as_an_engine(remote: Proxy) -> None:
    response = _speak(remote, "ours", "Spoken by the other server.")
    samples = _samples(response)
    assert response.status_code == 200 and len(samples) > 16000 * 0.5 and np.sqrt(np.mean(samples ** 2)) > 300


@pytest.mark.parametrize(("voice", "reason"), [("refusing", "refused"), ("hanging", "timeout"), ("endless", "too_much")])
def test_an_engine_that_fails_before_any_audio_is_spoken_for_by_its_fallback(remote: Proxy, voice: str, reason: str) -> None:
    before = _fallbacks(remote, reason)
    started = time.monotonic()
    response = _speak(remote, voice, "Nothing came from the engine.", fmt="wav")
    assert response.status_code == 200 and time.monotonic() - started < 20
    samples = _samples(response)
    # The fallback voice's speech, not a sine.
    assert len(samples) > 16000 * 0.5 and abs(_pitch(samples, 16000) - 440) > 5
    assert _fallbacks(remote, reason) > before


def test_an_engine_without_fallback_is_the_protocols_json_error_before_any_audio(remote: Proxy) -> None:
    response = _speak(remote, "refusing-bare", "Nothing at all.")
    assert response.status_code == 502 and response.json()["error"]["code"] == "ENGINE_FAILURE"


def test_an_engine_that_dies_after_audio_went_out(remote: Proxy) -> None:
    # The first piece is short enough to come whole; the second dies mid-way.
    text = "Hi. Then a much longer second sentence follows, which the engine never finishes saying."
    rescued = _speak(remote, "dying", text, fmt="wav")
    assert rescued.status_code == 200 and len(_samples(rescued)) / 16000 > 2.0  # the rest in the fallback voice
    ended = _speak(remote, "dying-bare", text, fmt="wav")
    # A clean end: a whole WAV of what was said before the engine died.
    assert ended.status_code == 200
    assert 0.15 < len(_samples(ended)) / 16000 < 1.0


def test_bad_remote_voices_stop_the_start_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from app.cli import cli
    from core.settings import get_settings

    cases = {
        "engine: nope, base_url: 'http://x:1/v1'": "voice 'v', field engine: unknown engine 'nope'",
        "engine: openai-speech, base_url: 'ftp://x'": "voice 'v', field base_url: must be an http:// or https:// URL",
        "engine: openai-speech, base_url: 'http://x:1/v1', fallback: nobody": "voice 'v', field fallback: 'nobody' is not a local voice",
        "engine: openai-speech, base_url: 'http://x:1/v1', api_key: '${NOT_SET_ANYWHERE}'": "voice 'v', field api_key: ${NOT_SET_ANYWHERE} is not set",
        "engine: openai-speech, base_url: 'http://x:1/v1', timeout_ms: 5": "voice 'v', field timeout_ms:",
    }
    # `serve --only` sets SERVICES for its workers: restored after the test.
    monkeypatch.setenv("SERVICES", "all")
    for entry, expected in cases.items():
        (tmp_path / "voices.yaml").write_text(f"voices:\n  v: {{{entry}}}\n")
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(cli, ["serve", "--only", "tts"], env={"VOICES_DIR": str(tmp_path)})
        finally:
            get_settings.cache_clear()
        assert result.exit_code == 1, (entry, result.output)
        assert expected in result.output and "Traceback" not in result.output and result.output.count("\n") == 1, result.output


def test_an_engines_slots_go_to_first_pieces_first() -> None:
    import asyncio

    from tts_server.engines import Slots

    async def scenario() -> list[str]:
        slots = Slots(4)  # one of four kept for first pieces
        order: list[str] = []
        for _ in range(3):
            await slots.acquire(2)  # pieces asked ahead take what they may
        ahead = asyncio.create_task(slots.acquire(1))
        await asyncio.sleep(0)
        assert not ahead.done()  # the last slot is a first piece's
        await slots.acquire(0)
        order.append("first piece in at once")
        waiting = [asyncio.create_task(slots.acquire(p)) for p in (3, 0)]
        leaving = asyncio.create_task(slots.acquire(0))
        await asyncio.sleep(0)
        leaving.cancel()
        slots.release()  # a slot frees: the waiting first piece goes before the pieces ahead
        await asyncio.sleep(0)
        order.append(f"first piece: {waiting[1].done()}, ahead: {ahead.done()}, later: {waiting[0].done()}")
        for _ in range(3):
            slots.release()
        await asyncio.gather(ahead, waiting[0])
        order.append("all in")
        return order

    assert asyncio.run(scenario()) == ["first piece in at once", "first piece: True, ahead: False, later: False", "all in"]
