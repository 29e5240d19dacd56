"""`memory.summarizer.fold` against the fake upstream over real HTTP: what the memory upstream
answers is never trusted. No text (or only reasoning) is a failure, not an empty memory; think
blocks are not kept; a trickling answer fails at the deadline; an endless one is cut off and the
request asks for a bounded answer."""

from __future__ import annotations

import asyncio
import time

import pytest

from llm_proxy.upstream import Upstream as UpstreamClient
from memory.summarizer import SUMMARY_INSTRUCTIONS, FoldFailed, Writer, fold
from tests.support import Upstream, marker, wait_until


def _fold(upstream: Upstream, model: str, said: str, *, max_chars: int = 200, deadline_s: float = 10.0) -> str:
    async def run() -> str:
        client = UpstreamClient(upstream.base_url, "", timeout_s=10)
        try:
            writer = Writer(client, model, max_chars)
            return await fold(writer, SUMMARY_INSTRUCTIONS, "The user is Ann.", [{"role": "user", "content": said}],
                              deadline_s=deadline_s)
        finally:
            await client.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("answer", ["[[reply:]]", "[[reply:   ]]", "[[think:only thoughts]][[reply:]]"])
def test_an_answer_with_no_text_is_a_failure_not_an_empty_memory(upstream: Upstream, answer: str) -> None:
    with pytest.raises(FoldFailed, match="no text"):
        _fold(upstream, f"m{answer}", marker())


def test_reasoning_is_not_kept(upstream: Upstream) -> None:
    said = marker()
    text = _fold(upstream, "m[[think:she might be Bob]][[reasoning:hidden steps]][[reply:Ann likes tea.]]", said)
    assert text == "Ann likes tea."


def test_a_trickling_upstream_fails_at_the_deadline(upstream: Upstream) -> None:
    started = time.monotonic()
    with pytest.raises(FoldFailed, match="within 0.5 s"):
        _fold(upstream, "m[[words:20]][[delay:1]]", marker(), deadline_s=0.5)
    assert time.monotonic() - started < 3


def test_an_endless_answer_is_cut_off_and_the_request_asks_for_a_bounded_one(upstream: Upstream) -> None:
    said = marker()
    text = _fold(upstream, "m[[words:5000]][[delay:0.002]]", said, max_chars=100)
    assert len(text) <= 100 and text.startswith("w0 w1")
    assert upstream.requests(said)[-1]["max_tokens"] == 200
    # The stream was closed long before its end: the upstream stopped generating.
    abandoned = wait_until(lambda: upstream.abandoned(said), what="the stream abandoned")
    assert abandoned[0]["sent"] < 500


def test_a_think_block_that_never_closes_is_cut_off(upstream: Upstream) -> None:
    said = marker()
    with pytest.raises(FoldFailed, match="no text"):
        _fold(upstream, "m[[think:" + "hmm " * 20_000 + "]][[reply:late]]", said, max_chars=100)
