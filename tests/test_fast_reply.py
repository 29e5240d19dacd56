"""Fast replies (`llm_proxy/fast_reply.py`): a small model's line said while a slow main model
thinks, raced and never queued, through real HTTP with the official client on both databases.
The fake upstream is scripted per model (the directives in each profile's model names): a slow
main model, a quick small one, one that fails, hangs, says too much or nothing speakable."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from llm_proxy.fast_reply import DEFAULT_PROMPT, SPOKEN_NOTE, spoken_line
from tests.conftest import ADMIN_KEY
from tests.support import InProcessProxy, Upstream, headers, marker, wait_until

LINE = "Sure, let me check."


def _profiles(upstream: Upstream) -> str:
    url = upstream.base_url

    def profile(name: str, main: str, small: str, after_ms: int = 150, extra: str = "") -> str:
        return (f"  - name: {name}\n    models: [{name}]\n    tools: []\n"
                f"    upstream: {{base_url: '{url}', model: '{main}'}}\n{extra}"
                f"    fast_reply: {{upstream: {{base_url: '{url}', model: '{small}'}}, after_ms: {after_ms}, max_chars: 40}}\n")

    return "profiles:\n" + "".join([
        profile("slow-main", "main[[first_delay:0.6]]", f"small[[reply:{LINE}]]"),
        profile("fast-main", "main", f"small[[reply:{LINE}]][[first_delay:0.4]]"),
        profile("late-line", "main[[first_delay:0.8]]", "small[[reply:好的，我查一下]][[first_delay:0.35]]", after_ms=100),
        profile("small-fails", "main[[first_delay:0.4]]", "small[[status:500]]"),
        profile("small-long", "main[[first_delay:0.4]]", "small[[words:30]]"),
        profile("small-unspeakable", "main[[first_delay:0.4]]", "small[[reply:😀 🎉 ...]]"),
        profile("small-hangs", "main[[first_delay:0.4]]", "small[[first_delay:30]]"),
        profile("still-writing", "main[[first_delay:0.4]]", "small[[words:4]][[delay:0.3]]"),
        profile("falls-back", "main[[status:503]]", f"small[[reply:{LINE}]]",
                extra=f"    fallbacks: [{{base_url: '{url}', model: 'backup[[first_delay:0.5]]'}}]\n"),
        "  - {name: plain, default: true, tools: []}\n",
    ])


@pytest.fixture(scope="module")
def fast(migrated_url: str, start_proxy_for_module: Any, upstream: Upstream,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessProxy]:
    config = tmp_path_factory.mktemp("fast") / "profiles.yaml"
    config.write_text(_profiles(upstream))
    yield start_proxy_for_module(
        {"DATABASE_URL": migrated_url, "CONFIG_FILE": str(config), "ADMIN_API_KEYS": ADMIN_KEY}, in_process=True
    )


def _stream(server: InProcessProxy, model: str, text: str, task: str, request_id: str) -> list[str]:
    chunks = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True, extra_headers=headers(task, request_id)
    )
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def _metric(server: InProcessProxy, profile: str, outcome: str) -> float:
    found = re.search(rf'trtc_llm_fast_replies_total{{outcome="{outcome}",profile="{profile}"}} ([0-9.]+)',
                      httpx.get(server.url + "/metrics").text)
    return float(found.group(1)) if found else 0.0


def _round(server: InProcessProxy, task: str, seq: int = 1) -> dict[str, Any]:
    detail = httpx.get(f"{server.url}/admin/v1/tasks/{task}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    return next(r for r in detail["rounds"] if r["seq"] == seq)


def _reply(round_: dict[str, Any]) -> str:
    return "".join(m["content"] or "" for m in round_["messages"] if m["role"] == "assistant")


def test_a_slow_model_is_preceded_by_the_line_which_is_stored_and_remembered(fast: InProcessProxy, upstream: Upstream) -> None:
    task, mark = f"fast-{uuid.uuid4().hex}", marker()
    spoken = _metric(fast, "slow-main", "spoken")
    chunks = _stream(fast, "slow-main", f"what is the weather {mark}", task, "r1")
    # The line is its own first chunk, with a space before what follows.
    assert chunks[0] == LINE + " "
    text = "".join(chunks)
    assert text == f"{LINE} You said: what is the weather {mark}"
    assert _metric(fast, "slow-main", "spoken") == spoken + 1
    stored = _round(fast, task)
    assert _reply(stored) == text and stored["fast_reply"] == LINE + " "
    # The small model got the prompt and the user's words, no tools; the main model was told.
    small = next(b for b in upstream.requests(mark) if b["model"].startswith("small"))
    assert small["messages"][0]["content"].startswith(DEFAULT_PROMPT.split("{")[0]) and "tools" not in small
    assert small["messages"][1]["content"] == f"what is the weather {mark}"
    main = next(b for b in upstream.requests(mark) if b["model"].startswith("main"))
    assert main["messages"][-2] == {"role": "system", "content": SPOKEN_NOTE}
    # A retry of the same request replays the same words; the next round's context has them.
    assert "".join(_stream(fast, "slow-main", f"what is the weather {mark}", task, "r1")) == text
    second = marker()
    _stream(fast, "slow-main", f"and tomorrow {second}", task, "r2")
    history = next(b for b in upstream.requests(second) if b["model"].startswith("main"))["messages"]
    assert {"role": "assistant", "content": text} in history


def test_a_quick_main_model_drops_the_line(fast: InProcessProxy) -> None:
    task, mark = f"fast-{uuid.uuid4().hex}", marker()
    dropped = _metric(fast, "fast-main", "dropped")
    assert "".join(_stream(fast, "fast-main", f"hi {mark}", task, "r1")) == f"You said: hi {mark}"
    assert _metric(fast, "fast-main", "dropped") == dropped + 1
    assert _round(fast, task)["fast_reply"] is None


def test_a_line_that_is_ready_late_is_said_when_ready(fast: InProcessProxy) -> None:
    task, mark = f"fast-{uuid.uuid4().hex}", marker()
    chunks = _stream(fast, "late-line", f"查一下订单 {mark}", task, "r1")
    assert chunks[0] == "好的，我查一下。" and "".join(chunks) == f"好的，我查一下。You said: 查一下订单 {mark}"


@pytest.mark.parametrize("profile", ["small-fails", "small-long", "small-unspeakable"])
def test_a_small_model_that_fails_changes_nothing(fast: InProcessProxy, profile: str) -> None:
    task, mark = f"fast-{uuid.uuid4().hex}", marker()
    failed = _metric(fast, profile, "failed")
    assert "".join(_stream(fast, profile, f"hello {mark}", task, "r1")) == f"You said: hello {mark}"
    assert _metric(fast, profile, "failed") == failed + 1
    assert _round(fast, task)["fast_reply"] is None


def test_a_line_still_being_written_or_never_coming_is_dropped(fast: InProcessProxy, upstream: Upstream) -> None:
    for profile in ("still-writing", "small-hangs"):
        task, mark = f"fast-{uuid.uuid4().hex}", marker()
        dropped = _metric(fast, profile, "dropped")
        assert "".join(_stream(fast, profile, f"hello {mark}", task, "r1")) == f"You said: hello {mark}"
        assert _metric(fast, profile, "dropped") == dropped + 1
        # The small model's stream was closed: its tokens are no longer paid for.
        wait_until(lambda: upstream.abandoned(mark), timeout=5, what=f"{profile}'s small stream to be closed")


def test_a_fallback_answers_behind_the_spoken_line(fast: InProcessProxy) -> None:
    task, mark = f"fast-{uuid.uuid4().hex}", marker()
    text = "".join(_stream(fast, "falls-back", f"hello {mark}", task, "r1"))
    assert text == f"{LINE} You said: hello {mark}"
    stored = _round(fast, task)
    assert stored["upstream"].endswith("#backup[[first_delay:0.5]]") and _reply(stored) == text


def test_a_client_that_waits_for_the_whole_answer_gets_no_line(fast: InProcessProxy, upstream: Upstream) -> None:
    task, mark = f"fast-{uuid.uuid4().hex}", marker()
    reply = fast.client().chat.completions.create(
        model="slow-main", messages=[{"role": "user", "content": f"hi {mark}"}], extra_headers=headers(task, "r1")
    )
    assert reply.choices[0].message.content == f"You said: hi {mark}"
    assert not any(b["model"].startswith("small") for b in upstream.requests(mark))


def test_a_client_gone_after_the_line_keeps_it_as_heard(fast: InProcessProxy, upstream: Upstream) -> None:
    task, mark = f"fast-{uuid.uuid4().hex}", marker()
    stream = fast.client().chat.completions.create(
        model="slow-main", messages=[{"role": "user", "content": f"long one {mark}"}], stream=True,
        extra_headers=headers(task, "r1"),
    )
    first = next(c for c in stream if c.choices and c.choices[0].delta.content)
    assert first.choices[0].delta.content == LINE + " "
    stream.close()
    wait_until(lambda: _round(fast, task)["status"] == "interrupted", timeout=10, what="the round stored as interrupted")
    assert _reply(_round(fast, task)) == LINE + " "
    # The main model's call, still waiting for its first token, was given up.
    wait_until(lambda: any(b["model"].startswith("main") for b in upstream.requests(mark)), what="the main call")


def test_the_line_as_spoken() -> None:
    assert spoken_line("  Sure,  let me check ", 40) == "Sure, let me check. "
    assert spoken_line("好的，我查一下", 40) == "好的，我查一下。"
    assert spoken_line("好的，", 40) == "好的。" and spoken_line("One moment,", 40) == "One moment. "
    assert spoken_line("Okay!", 40) == "Okay! "
    assert spoken_line("x" * 41, 40) is None and spoken_line("...", 40) is None and spoken_line("", 40) is None


def test_the_profile_field_is_checked(tmp_path: Path) -> None:
    from llm_proxy.profiles import ConfigError, load_file

    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles:\n  - name: p\n    fast_reply: {upstream: {base_url: 'ftp://x'}, after_ms: 5}\n")
    with pytest.raises(ConfigError) as error:
        load_file(bad)
    assert "profile 'p', field fast_reply.upstream.base_url" in str(error.value)
    assert "fast_reply.after_ms" in str(error.value)
