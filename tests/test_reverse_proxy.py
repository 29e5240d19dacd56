"""The reverse-proxy example of docs/deploying.md, run as written: Debian's nginx with the block taken from
docs/deploying.md in front of a server, and the orchestrator's three paths driven through it (a chat round,
a TTS stream, a signed callback, and `trtc-backend validate`); the rest of the backend stays
private."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from orchestrator.protocol import sign
from tests.conftest import CALLBACK_KEY
from tests.support import API_KEY, CLI, ROOT, Proxy, ServerProcess, headers, marker

NGINX = "/usr/sbin/nginx"


def _readme_block() -> str:
    block = re.search(r"<!-- nginx -->\n```nginx\n(.*?)```\n<!-- /nginx -->", (ROOT / "docs" / "deploying.md").read_text(), re.S)
    assert block, "docs/deploying.md's nginx block is missing"
    return block.group(1)


class Nginx(ServerProcess):
    """nginx in the foreground, in one process, everything it writes under its own folder."""

    def start(self, location: str) -> None:
        prefix = self.log_path.parent
        for folder in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / folder).mkdir(parents=True, exist_ok=True)
        temp = " ".join(f"{kind}_temp_path {prefix / folder};" for kind, folder in (
            ("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"), ("uwsgi", "uwsgi"), ("scgi", "scgi")))
        (prefix / "nginx.conf").write_text(
            f"daemon off; master_process off; pid {prefix / 'nginx.pid'}; error_log {self.log_path} info;\n"
            "events { worker_connections 256; }\n"
            f"http {{ access_log {prefix / 'access.log'}; {temp}\n"
            f"  server {{ listen 127.0.0.1:{self.port};\n{location}\n  }}\n}}\n"
        )
        self._spawn([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(self.log_path)], {}, prefix)
        self._wait_ready("/")  # nginx's own 404: it serves


@pytest.fixture(scope="module")
def backend(start_proxy_for_module) -> Proxy:
    return start_proxy_for_module({"CALLBACK_SIGN_KEY": CALLBACK_KEY}, args=())


@pytest.fixture(scope="module")
def nginx(backend: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if not shutil.which("nginx") and not Path(NGINX).exists():
        pytest.fail("Debian's nginx is not installed: run `make nginx` (make test does)")
    location = _readme_block()
    assert "proxy_http_version 1.1;" in location and "proxy_buffering off;" in location
    server = Nginx(tmp_path_factory.mktemp("nginx") / "error.log")
    server.start(location.replace("http://127.0.0.1:8000", backend.url))
    yield server
    server.stop()


def test_a_chat_round_streams_through_the_proxy(nginx: Nginx, backend: Proxy) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    stream = backend.client().with_options(base_url=nginx.url + "/v1").chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": f"{tag} [[reply:Hello through nginx.]]"}],
        extra_headers=headers(task_id),
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello through nginx."
    assert backend.rounds(task_id)[0]["messages"][-1]["content"] == "Hello through nginx."


def test_the_tts_stream_stays_chunked_with_its_content_type(nginx: Nginx, backend: Proxy) -> None:
    body = {"Text": "Hello there.", "Format": "pcm", "SampleRate": 16000, "Channel": 1}
    auth = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": marker()}
    with httpx.stream("POST", nginx.url + "/api/v1/tts/stream", json=body, headers=auth, timeout=30) as proxied:
        audio = b"".join(proxied.iter_bytes())
    direct = httpx.post(backend.url + "/api/v1/tts/stream", json=body, headers=auth, timeout=30)
    assert proxied.status_code == 200 == direct.status_code
    assert proxied.headers["transfer-encoding"] == "chunked" and "content-length" not in proxied.headers
    assert proxied.headers["content-type"] == direct.headers["content-type"]
    assert len(audio) > 16000 and len(audio) % 2 == 0


def test_a_signed_callback_reaches_the_backend(nginx: Nginx, backend: Proxy) -> None:
    raw = json.dumps({"EventGroupId": 9, "EventType": 901, "CallbackTs": 1, "EventInfo": {
        "EventMsTs": 1, "TaskId": f"task-{marker()}", "Payload": {"Status": 0}}}).encode()
    response = httpx.post(nginx.url + "/api/v1/trtc/callback", content=raw, headers={"Sign": sign(CALLBACK_KEY, raw)})
    assert response.status_code == 200 and response.json() == {"code": 0}


def test_the_validator_passes_through_the_proxy(nginx: Nginx) -> None:
    run = subprocess.run(
        [CLI, "validate", "--json", "--llm-url", nginx.url + "/v1/chat/completions", "--llm-key", API_KEY,
         "--tts-url", nginx.url + "/api/v1/tts/stream", "--tts-key", API_KEY, "--rounds", "2",
         "--interrupt-ms", "400", "--callback-url", nginx.url + "/api/v1/trtc/callback", "--callback-key", CALLBACK_KEY],
        capture_output=True, text=True, timeout=120,
    )
    report = json.loads(run.stdout)
    assert run.returncode == 0 and report["ok"], [c for c in report["checks"] if not c["ok"]]


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/admin/v1/tasks", "/console/"])
def test_the_rest_of_the_backend_stays_private(nginx: Nginx, path: str) -> None:
    assert httpx.get(nginx.url + path).status_code == 404
