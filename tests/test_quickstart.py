"""The README's quick start, run as written against a fresh server: the chat round with the
TRTC headers and the key from `data/api_key`, and the TTS request."""

from __future__ import annotations

import re
import subprocess
import wave
from pathlib import Path

from tests.support import ROOT, Proxy, Upstream


def test_the_readmes_curl_examples_work_as_written(upstream: Upstream, tmp_path: Path) -> None:
    block = re.search(r"<!-- quickstart -->\n```sh\n(.*?)```\n<!-- /quickstart -->", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README's quick start block is missing"
    # A server as `make run` makes it: no API_KEYS, so it generates data/api_key.
    server = Proxy(tmp_path / "quickstart", {"API_KEYS": "", "UPSTREAM_BASE_URL": upstream.base_url})
    from migrations import upgrade

    upgrade(server.database_url)
    server.start()
    try:
        script = block.group(1).replace("http://127.0.0.1:8000", server.url)
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=server.workdir, capture_output=True,
                             text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        events = [line for line in ran.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "Hello! Who are you?" in ran.stdout
        with wave.open(str(server.workdir / "hello.wav")) as audio:
            assert (audio.getframerate(), audio.getnchannels()) == (16000, 1)
            assert len(audio.readframes(1 << 30)) > 16000  # over half a second of speech
        assert [r["request_id"] for r in server.rounds("demo-task-1")] == ["demo-request-1"]
    finally:
        server.stop()
