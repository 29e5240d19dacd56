"""`trtc-backend validate` against this project (every requirement met) and against endpoints
that each break one rule (each failure reported with its reason)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Iterator

import pytest

from tests.conftest import CALLBACK_KEY
from tests.support import API_KEY, CLI, ROOT, Proxy, ServerProcess


class BrokenEndpoints(ServerProcess):
    def start(self) -> None:
        self._spawn(
            [sys.executable, "-m", "uvicorn", "tests.broken_endpoints:app", "--port", str(self.port), "--log-level", "warning"],
            {"PYTHONPATH": str(ROOT)}, self.log_path.parent,
        )
        self._wait_ready("/good/v1/chat/completions")


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokenEndpoints]:
    server = BrokenEndpoints(tmp_path_factory.mktemp("broken") / "broken.log")
    server.start()
    yield server
    server.stop()


def _validate(*args: str) -> tuple[int, dict[str, Any]]:
    run = subprocess.run([CLI, "validate", "--json", *args], capture_output=True, text=True, timeout=120)
    return run.returncode, json.loads(run.stdout)


def _failed(report: dict[str, Any]) -> dict[str, str]:
    return {check["requirement"]: check["detail"] for check in report["checks"] if not check["ok"]}


def test_this_project_meets_every_requirement(proxy: Proxy) -> None:
    code, report = _validate(
        "--llm-url", proxy.url + "/v1/chat/completions", "--llm-key", API_KEY,
        "--tts-url", proxy.url + "/api/v1/tts/stream", "--tts-key", API_KEY,
        "--rounds", "2", "--history", "2", "--interrupt-ms", "400",
        "--callback-url", proxy.url + "/api/v1/trtc/callback", "--callback-key", CALLBACK_KEY,
    )
    assert code == 0 and report["ok"], _failed(report)
    requirements = [check["requirement"] for check in report["checks"]]
    assert "round 1: a retry with the same X-Request-Id is answered" in requirements
    assert 'a signed 905 is answered 200 {"code": 0} within 5 s' in requirements
    assert 'a signed 903 is answered 200 {"code": 0} within 5 s' in requirements
    [retry] = [c for c in report["checks"] if c["requirement"] == "round 1: a retry with the same X-Request-Id is answered"]
    assert retry["detail"].startswith("the same reply")
    # Each requirement says whether the documentation states it or it is this project's reading.
    basis = {check["requirement"]: check["basis"] for check in report["checks"]}
    assert basis["round 1: LLM first token within Timeout 3 s"] == "inferred"
    assert basis["round 1: LLM streams SSE to [DONE]"] == "documented"
    for metrics in report["rounds"]:
        assert metrics["llm_first_token_ms"] > 0 and metrics["tts_first_frame_latency_ms"] > 0
    # The interruption's 905 cut round 1 to what was played; round 2 was answered after it.
    first, second = proxy.rounds(report["task_id"])
    assert first["interrupted"] and len(first["messages"][-1]["content"]) < len(report["rounds"][0]["reply"])
    assert report["rounds"][0]["reply"].startswith(first["messages"][-1]["content"])
    assert second["status"] == "completed"


@pytest.mark.parametrize(
    ("llm_mode", "tts_mode", "extra", "requirement", "reason"),
    [
        ("good", "ctype", [], "round 1: TTS answers every sentence as the orchestrator requires",
         "TTS answered Content-Type audio/x-wav; the orchestrator accepts exactly audio/L16"),
        ("good", "sized", [], "round 1: TTS answers every sentence as the orchestrator requires",
         "without Transfer-Encoding: chunked"),
        ("json", "good", [], "round 1: LLM streams SSE to [DONE]", "must be text/event-stream"),
        ("no_done", "good", [], "round 1: LLM streams SSE to [DONE]", "without data: [DONE]"),
        ("slow", "good", ["--timeout-s", "1"], "round 1: LLM first token within Timeout 1 s", "ms"),
        ("good", "error_shape", [], 'TTS errors are JSON {"error": {"code", "message"}}', '{"message":"no text"}'),
    ],
    ids=["tts-content-type", "tts-not-chunked", "llm-not-sse", "llm-no-done", "llm-slow", "tts-error-shape"],
)
def test_each_broken_rule_is_reported_with_its_reason(
    broken: BrokenEndpoints, llm_mode: str, tts_mode: str, extra: list[str], requirement: str, reason: str
) -> None:
    code, report = _validate(
        "--llm-url", f"{broken.url}/{llm_mode}/v1/chat/completions", "--llm-key", "k",
        "--tts-url", f"{broken.url}/{tts_mode}/tts", "--tts-key", "k", "--rounds", "1", *extra,
    )
    failed = _failed(report)
    assert code == 1 and not report["ok"]
    assert requirement in failed and reason in failed[requirement], failed
    assert len(failed) == 1, failed  # only the broken rule


def test_the_text_report_names_each_requirement(broken: BrokenEndpoints) -> None:
    run = subprocess.run(
        [CLI, "validate", "--llm-url", f"{broken.url}/good/v1/chat/completions", "--llm-key", "k",
         "--tts-url", f"{broken.url}/ctype/tts", "--rounds", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1
    assert "FAIL" in run.stdout and "audio/x-wav" in run.stdout and "1 requirement(s) failed" in run.stdout
