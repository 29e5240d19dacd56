"""Text fit for a speaker, as it streams: what the TTS server reads of any text it is given
(`text.normalize`), and what the chat proxy streams for a profile with `output.speakable`.

Models write markdown for screens; read aloud, its marks are noise ("asterisk asterisk"). This
filter takes out, as the text streams: emphasis, code and other stray marks (`*`, backticks,
`~`, `^`, `#`), headings, quote and list markers, code fence lines, table rules and pipes,
horizontal rules, HTML tags, emoji and bare URLs; a link or an image becomes its text. Chinese
and English alike (it works on marks, not words).

Streaming-safe: the text of a line is let out as soon as nothing in it may still be the start
of a mark. Only what may be held back is: the start of a line until its marker is known (a few
characters; a table or rule line until it ends), a `[` until its link ends, a `<` until its tag
ends, a URL until it ends, and a trailing `_` or `!` for one character. `flush` lets out the rest
at the end. The result is the same whatever chunk boundaries cut the text.
"""

from __future__ import annotations

import re

# Emoji and their joiners.
EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # pictographs, emoticons, transport, symbols and pictographs ext.
    "\U00002600-\U000027bf"  # misc symbols, dingbats
    "\U00002b00-\U00002bff"  # arrows and stars used as emoji
    "\U0001f1e6-\U0001f1ff"  # flags
    "\ufe0e\ufe0f\u200d\u20e3"  # variation selectors, joiner, keycap
    "]+"
)
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_LINK = re.compile(r"\[([^\]\n]+)\]\([^)\n]*\)")
# A URL ends at a space, a bracket or CJK punctuation, and not on a sentence's full stop or comma.
_URL_CHARS = r"[^\s<>()\[\]{}，。！？、；：“”‘’（）【】]"
_URL = re.compile(rf"(?:https?://|www\.){_URL_CHARS}*(?<![.,;:!?'\"])", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>\n]*)?/?>")
_MARKS = re.compile(r"[*`~#]+")  # a line's leading `#` is a heading, taken before
# Marks that stand between two words or numbers ("a | b", "2^3"): a space, not nothing.
_SPACED_MARKS = re.compile(r"[|^]")
_UNDERSCORE = re.compile(r"(?<![^\W_])_+|_+(?![^\W_])")  # not between two letters or digits

# A line's start: what it must be held for, and what it is once known.
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)")
_QUOTE = re.compile(r"^\s{0,3}>\s?")
_LIST = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")
_RULE = re.compile(r"^\s*(?:[-*_]\s*){3,}$")
_TABLE_RULE = re.compile(r"^\s*\|?(?:\s*:?-+:?\s*\|)+\s*(?::?-+:?\s*)?$")
# Line starts that are not known yet: more characters will tell.
_UNDECIDED_START = re.compile(r"^\s*(?:#{1,6}|>|[-*+•]|\d{1,3}[.)]?|`{1,2}|~{1,2}|(?:[-*_]\s*)+|\|.*)?$")
_WHOLE_LINE = re.compile(r"^\s*(?:\||(?:[-*_]\s*){2,}$)")  # table rows and rules: held to their end

# A construct still open at the end of the text so far, from where it starts.
_OPEN_END = re.compile(
    rf"(?:!?\[[^\]\n]*(?:\](?:\([^)\n]*)?)?|!|<(?:[/A-Za-z][^<>\n]*)?|(?:https?://|www\.){_URL_CHARS}*|"
    r"(?<![^\W_])(?:h|ht|htt|http|https|https?:|https?:/|w|ww|www)|_+)$",
    re.IGNORECASE,
)


def _content(text: str, before: str = "") -> str:
    """The marks taken out of text inside a line (whole constructs only); `before`: the line's
    character just before it, which tells whether an underscore joins two words."""
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _TAG.sub("", text)
    text = EMOJI.sub("", text)
    text = _MARKS.sub("", text)
    joined, kept, last = before[-1:] + text, [], len(before[-1:])
    for match in _UNDERSCORE.finditer(joined, last):  # looks behind into `before`
        kept.append(joined[last : match.start()])
        last = match.end()
    kept.append(joined[last:])
    return _SPACED_MARKS.sub(" ", "".join(kept))


def _masked(text: str) -> str:
    """`text` with its complete links and images blanked out (same length), so that a URL inside
    one is not taken for an open one."""
    for pattern in (_IMAGE, _LINK):
        text = pattern.sub(lambda match: "\0" * len(match.group(0)), text)
    return text


class SpeakableFilter:
    def __init__(self) -> None:
        self._pending = ""  # text of the current line not let out yet
        self._mid_line = False  # part of the current line is out: its start is settled
        self._before = ""  # the last character of the line let out
        self._in_fence = False

    def feed(self, text: str) -> str:
        self._pending += text
        out: list[str] = []
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            out.append(self._line_end(line))
        out.append(self._line_so_far())
        return "".join(out)

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        out = self._line_end(rest)
        return out[:-1] if out.endswith("\n") else out

    def _line_end(self, line: str) -> str:
        """A whole line (or the rest of one), with its newline if it keeps one."""
        mid, self._mid_line = self._mid_line, False
        if not mid:
            if _FENCE.match(line):
                self._in_fence = not self._in_fence
                return ""
            if _TABLE_RULE.match(line) or _RULE.match(line):
                return ""
            line = self._strip_start(line)
        before, self._before = self._before, ""
        return _content(line, before) + "\n"

    def _line_so_far(self) -> str:
        text = self._pending
        if not self._mid_line:
            if not text or _UNDECIDED_START.match(text) or _FENCE.match(text) or _WHOLE_LINE.match(text):
                return ""
            text = self._strip_start(text)
        open_at = _OPEN_END.search(_masked(text))
        cut = open_at.start() if open_at else len(text)
        ready, self._pending = text[:cut], text[cut:]
        self._mid_line = True
        out = _content(ready, self._before)
        self._before = (self._before + ready)[-1:]
        return out

    @staticmethod
    def _strip_start(line: str) -> str:
        for marker in (_HEADING, _QUOTE, _LIST):
            line = marker.sub("", line, count=1)
        return line
