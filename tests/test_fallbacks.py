"""A profile's fallbacks, inside the orchestrator's budget: the next upstream is tried when one
is unreachable, fails (5xx, 429) or stays silent before its first token; never after it. The
upstreams are the fake upstream with behaviours named in their model (`m[[status:500]]`)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from sqlalchemy import select

from llm_proxy.models import Round
from tests.support import Proxy, Upstream, free_port, headers, marker, run_db


# One server for the module: a profile per case, chosen by the model the test asks for; each
# falls back to the fake upstream's well-behaved `backup` model.
PRIMARIES = {
    "5xx": "m[[status:500]]",
    "429": "m[[status:429]]",
    "error-before-text": "m[[fail_after:0]]",
    "unreachable": "m",
    "silent": "m[[first_delay:30]]",
    "fails-mid-text": "m[[fail_after:2]]",
    "refused": "m[[status:400]]",
    "html": "m[[content_type:text/html]]",
    "no-choices": "m[[null_choices:1]]",
}


@pytest.fixture(scope="module")
def server(start_proxy_for_module, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Proxy:
    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    lines = ["profiles:"]
    for case, primary in PRIMARIES.items():
        lines += [
            f"  - name: '{case}'",
            f"    models: ['{case}']",
            f"    upstream: {{base_url: '{unreachable if case == 'unreachable' else upstream.base_url}', model: '{primary}'}}",
            "    fallbacks:",
            f"      - {{base_url: '{upstream.base_url}', model: 'backup'}}",
        ]
        if case == "silent":
            lines.append("    first_token_timeout_s: 0.5")
    config = tmp_path_factory.mktemp("fallbacks") / "profiles.yaml"
    config.write_text("\n".join(lines) + "\n")
    return start_proxy_for_module({"CONFIG_FILE": str(config)}, in_process=True)


def _ask(server: Proxy, case: str, text: str, task_id: str) -> tuple[str, float]:
    started = time.perf_counter()
    first = 0.0
    parts = []
    for chunk in server.client().chat.completions.create(
        model=case, stream=True, extra_headers=headers(task_id), messages=[{"role": "user", "content": text}],
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts), first


def _answered_by(server: Proxy, task_id: str) -> str:
    return run_db(server.database_url, lambda conn: conn.execute(select(Round.upstream).where(Round.task_id == task_id)).scalar_one())


def _fallbacks(server: Proxy, case: str, reason: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'trtc_llm_fallbacks_total{{profile="{case}",reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize(
    ("case", "reason"),
    [("5xx", "upstream_failed"), ("429", "upstream_rate_limited"), ("error-before-text", "upstream_failed"),
     ("html", "upstream_invalid"), ("no-choices", "upstream_invalid")],
)
def test_a_failing_upstream_hands_the_round_to_the_next(server: Proxy, upstream: Upstream, case: str, reason: str) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    text, _first = _ask(server, case, f"{tag} hello", task_id)
    assert text == f"You said: {tag} hello"
    assert _answered_by(server, task_id) == f"{upstream.base_url}#backup"
    assert _fallbacks(server, case, reason) == 1
    assert [r["messages"][-1]["content"] for r in server.rounds(task_id)] == [text]  # one stored round


def test_an_unreachable_upstream_hands_the_round_to_the_next(server: Proxy) -> None:
    tag = marker()
    text, _first = _ask(server, "unreachable", f"{tag} hi", f"task-{tag}")
    assert text == f"You said: {tag} hi" and _fallbacks(server, "unreachable", "upstream_unreachable") == 1


def test_a_silent_upstream_is_left_within_the_budget(server: Proxy, upstream: Upstream) -> None:
    tag = marker()
    text, first = _ask(server, "silent", f"{tag} quick", f"task-{tag}")
    assert text == f"You said: {tag} quick"
    # 0.5 s waiting for the silent one, then the backup's first token: well inside 3 s.
    assert 0.5 <= first < 1.2, first
    assert _fallbacks(server, "silent", "first_token_timeout") == 1
    [silent] = [a for a in httpx.get(upstream.url + "/_abandoned").json() if tag in a["said"]]
    assert silent["sent"] == 0  # the silent one was cancelled


def test_no_fallback_once_the_first_token_is_out(server: Proxy, upstream: Upstream) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    with pytest.raises(openai.APIError):
        _ask(server, "fails-mid-text", f"{tag} words", task_id)
    assert len(upstream.requests(tag)) == 1  # the backup was never called
    [stored] = server.rounds(task_id)
    assert stored["interrupted"] and stored["messages"][-1]["content"] == "You said:"


def test_a_refusal_of_the_request_itself_is_not_retried_elsewhere(server: Proxy, upstream: Upstream) -> None:
    tag = marker()
    with pytest.raises(openai.APIStatusError) as refused:
        _ask(server, "refused", f"{tag} bad", f"task-{tag}")
    assert refused.value.body["code"] == "upstream_refused" and len(upstream.requests(tag)) == 1
