"""What reaches the speaker: the upstream's text with the model's hidden reasoning taken out
(and, for a profile with `output.speakable`, its markdown: `speakable.SpeakableFilter`).

Reasoning models (DeepSeek-R1, Qwen3, ...) write `<think>...</think>` into the content before
the answer; the orchestrator would read it aloud and the history would keep it. `ThinkFilter`
removes such spans as the text streams, whatever chunk boundaries cut the tags, holding back only
the few characters that might still be the start of a tag. (`reasoning_content` deltas never
become text here: the upstream client keeps only `content`.) `spoken` applies the filters to a
stream of deltas and drops the deltas they empty, so the first token the client gets, and the
time to it, is the first spoken one.
"""

from __future__ import annotations

from typing import AsyncGenerator, Protocol

from tts_server.speakable import SpeakableFilter
from llm_proxy.upstream import Delta

_OPEN, _CLOSE = "<think>", "</think>"


class ThinkFilter:
    def __init__(self) -> None:
        self._inside = False
        self._pending = ""
        # Right after a think block models write a blank line or two: not to be spoken.
        self._after_block = False

    def feed(self, text: str) -> str:
        self._pending += text
        out: list[str] = []
        while True:
            tag = _CLOSE if self._inside else _OPEN
            found = self._pending.find(tag)
            if found < 0:
                break
            if not self._inside:
                out.append(self._pending[:found])
            self._pending = self._pending[found + len(tag) :]
            self._inside = not self._inside
            self._after_block = not self._inside
        keep = _partial_tag(self._pending, _CLOSE if self._inside else _OPEN)
        ready, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
        if not self._inside:
            out.append(ready)
        return self._spoken("".join(out))

    def flush(self) -> str:
        """At the end: a tag that never completed was text; an unclosed block is dropped."""
        rest, self._pending = ("" if self._inside else self._pending), ""
        return self._spoken(rest)

    def _spoken(self, text: str) -> str:
        if self._after_block and text:
            text = text.lstrip()
            self._after_block = not text
        return text


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class _Filter(Protocol):
    def feed(self, text: str) -> str: ...

    def flush(self) -> str: ...


class _Chain:
    def __init__(self, filters: list[_Filter]) -> None:
        self._filters = filters

    def feed(self, text: str) -> str:
        for step in self._filters:
            text = step.feed(text) if text else ""
        return text

    def flush(self) -> str:
        text = ""
        for step in self._filters:
            text = (step.feed(text) if text else "") + step.flush()
        return text


async def spoken(
    deltas: AsyncGenerator[Delta, None], *, reasoning: bool = True, speakable: bool = False
) -> AsyncGenerator[Delta, None]:
    """`deltas` with think blocks (`reasoning`) and markdown (`speakable`) removed from their
    text; deltas left with nothing are dropped."""
    chain = _Chain([f for f in (ThinkFilter() if reasoning else None, SpeakableFilter() if speakable else None) if f])
    try:
        async for delta in deltas:
            text = chain.feed(delta.text) if delta.text else ""
            if delta.finish_reason:
                text += chain.flush()
            if text or delta.finish_reason or delta.usage or delta.calls:
                yield delta if text == delta.text else Delta(text, delta.finish_reason, delta.usage, delta.calls)
        rest = chain.flush()
        if rest:
            yield Delta(rest)
    finally:
        await deltas.aclose()
