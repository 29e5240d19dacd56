"""Hidden reasoning never reaches the speaker or the history (`llm_proxy/speech.py`): the filter
directly, with the tags cut at every possible chunk boundary, and through real HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from llm_proxy.speech import ThinkFilter
from tests.support import Proxy, headers, marker

REPLY = "<think>The user greets me; I should greet back.</think>\n\nHello there, nice to meet you."
SPOKEN = "Hello there, nice to meet you."


def _filtered(chunks: list[str]) -> str:
    think = ThinkFilter()
    return "".join(think.feed(chunk) for chunk in chunks) + think.flush()


def test_the_tags_cut_at_every_boundary_are_removed() -> None:
    for cut in range(len(REPLY) + 1):
        assert _filtered([REPLY[:cut], REPLY[cut:]]) == SPOKEN, cut
    for first in range(0, len(REPLY), 3):
        for second in range(first, len(REPLY), 5):
            assert _filtered([REPLY[:first], REPLY[first:second], REPLY[second:]]) == SPOKEN
    assert _filtered(list(REPLY)) == SPOKEN  # one character at a time


def test_text_that_only_looks_like_a_tag_is_kept() -> None:
    assert _filtered(["a < b and <thinker> or <th", "ink"]) == "a < b and <thinker> or <think"
    assert _filtered(["before ", "<think>unclosed"]) == "before "
    assert _filtered(["no tags at all"]) == "no tags at all"
    assert _filtered(["x<think>a</think>y<think>b</think>z"]) == "xyz"


def _stream(server: Proxy, content: str, model: str = "m") -> tuple[list[str], float]:
    started = time.perf_counter()
    first = 0.0
    texts = []
    for chunk in server.client().chat.completions.create(
        model=model, stream=True, extra_headers=headers(f"task-{marker()}"), messages=[{"role": "user", "content": content}],
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            texts.append(chunk.choices[0].delta.content)
    return texts, first


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 9, 13])
def test_think_blocks_never_reach_the_client_or_the_history(proxy: Proxy, size: int) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    reply = proxy.client().chat.completions.create(
        model="m", stream=True, extra_headers=headers(task_id),
        messages=[{"role": "user", "content": f"{tag} [[reply:hi]] [[think:plan {tag}]] [[chunk_chars:{size}]] [[delay:0.002]]"}],
    )
    texts = [c.choices[0].delta.content for c in reply if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == "hi" and texts[0].strip()
    [stored] = proxy.rounds(task_id)
    assert stored["messages"][-1] == {"role": "assistant", "content": "hi"}


def test_the_first_token_is_the_first_spoken_one(proxy: Proxy) -> None:
    # 30 chunks of thinking, 20 ms apart, before the answer: the client's first text is the answer's.
    texts, first = _stream(proxy, f"{marker()} [[reply:Sure.]] [[think:{'x' * 30}]] [[chunk_chars:1]] [[delay:0.02]]")
    assert texts[0] == "S" and first > 0.4


def test_reasoning_content_deltas_are_not_spoken(proxy: Proxy) -> None:
    texts, _first = _stream(proxy, f"{marker()} [[reply:Fine thanks.]] [[reasoning:I think about the answer]]")
    assert "".join(texts) == "Fine thanks."


def test_a_profile_can_keep_the_reasoning(start_proxy, tmp_path: Path) -> None:
    config = tmp_path / "profiles.yaml"
    config.write_text("profiles:\n  - {name: raw, default: true, output: {strip_reasoning: false}}\n")
    server = start_proxy({"CONFIG_FILE": str(config)}, in_process=True)
    texts, _first = _stream(server, f"{marker()} [[reply:ok]] [[think:plan]]")
    assert "".join(texts) == "<think>plan</think>\n\nok"


def test_openai_non_streaming_answers_are_filtered_too(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m", extra_headers=headers(f"task-{marker()}"), messages=[{"role": "user", "content": "[[reply:done]] [[think:hmm]]"}],
    )
    assert reply.choices[0].message.content == "done"
