"""Event 905 says what the bot actually said in a round; the stored reply is cut to it, so the
next round's context holds only what the user heard.

The 905 text and the stored reply differ in spacing, punctuation and character width (the
orchestrator and TTS change them; Chinese has no spaces; full-width and half-width marks differ),
so both are compared in a normalised form: NFKC, lower case, letters, digits and marks only. The
spoken text is then a prefix of the reply; the cut falls after the last character heard (and the
punctuation right after it). Plain functions: `cut_reply` on the round's messages, tested directly.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence

from llm_proxy.context import Msg

# Unicode categories that carry no words: punctuation, symbols (emoji), separators, controls.
_IGNORED = ("P", "S", "Z", "C")


def normalized(text: str) -> tuple[str, list[int]]:
    """The comparable form of `text`, and for each of its characters the index in `text` just
    after the character it came from."""
    out: list[str] = []
    ends: list[int] = []
    for index, char in enumerate(text):
        for part in unicodedata.normalize("NFKC", char).lower():
            if not unicodedata.category(part).startswith(_IGNORED):
                out.append(part)
                ends.append(index + 1)
    return "".join(out), ends


def reply_text(messages: Sequence[Msg]) -> str:
    """What the bot said in a round, in order: the text before each tool call, then the answer."""
    return "".join(m.get("content") or "" for m in messages if m["role"] == "assistant")


def heard_length(reply: str, spoken: str) -> int | None:
    """How many characters of `reply` the user heard, if `spoken` is (normalised) a prefix of it;
    None if it is not."""
    reply_norm, ends = normalized(reply)
    spoken_norm, _ = normalized(spoken)
    if not spoken_norm or not reply_norm.startswith(spoken_norm):
        return None
    if len(spoken_norm) == len(reply_norm):
        return len(reply)
    cut = ends[len(spoken_norm) - 1]
    while cut < len(reply) and unicodedata.category(reply[cut]).startswith("P"):
        cut += 1
    return cut


@dataclass(frozen=True)
class Cut:
    messages: list[Msg]
    unheard: str


def cut_reply(messages: Sequence[Msg], heard: int) -> Cut:
    """The round's messages with the assistant text after the first `heard` characters removed.
    Tool calls and their results stay (they ran; the sequence stays valid OpenAI), their text
    before the call is cut like the rest; an answer nobody heard becomes empty, which later
    contexts leave out."""
    out: list[Msg] = []
    unheard: list[str] = []
    position = 0
    for message in messages:
        if message["role"] != "assistant":
            out.append(message)
            continue
        content = message.get("content") or ""
        keep = max(0, min(len(content), heard - position))
        position += len(content)
        unheard.append(content[keep:])
        out.append({**message, "content": content[:keep]})
    return Cut(out, "".join(unheard))
