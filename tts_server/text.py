"""Text in, speakable pieces out: markdown, emoji and URLs removed; the text cut so the first
audio comes early; the language of each piece detected so it goes to a voice that speaks it.

Plain functions, tested directly.
"""

from __future__ import annotations

import re

from tts_server.speakable import SpeakableFilter

_SPACES = re.compile(r"[ \t\r\f\v]+")
# Control characters (NUL and the like) that no engine should be handed; tabs and newlines stay.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# Sentence ends, then clause marks a long first sentence may be cut at. A Western mark ends a
# sentence or clause only before a space (or the end): "3.14", "$12.50", "3:30" and "1,234" stay
# whole, so a piece never ends inside what `verbalize` reads as one number. CJK marks need no space.
_SENTENCE_END = re.compile(r"[.!?…;][\"'”’)）」』]*(?:\s+|$)|[。！？；][\"'”’)）」』]*\s*|\n+")
_CLAUSE_END = re.compile(r"[,:—–]\s+|[，、：]\s*")
# Abbreviations whose period ends no sentence ("Dr. Smith", "No. 5").
# (Also what `verbalize` spells out.)
ABBREVIATIONS = r"Dr|Mr|Mrs|Ms|St|No|Prof|Jr|Sr|vs|etc|e\.g|i\.e"
_ABBREVIATION = re.compile(rf"(?:^|\s)(?:{ABBREVIATIONS}|[A-Z])\.$")
# A CJK first piece cut by length moves its cut past a number with what belongs to it
# ("2026年11月27日", "3:30", "12.5元"), or past a Latin word.
_RUN = re.compile(r"[0-9][0-9.,:%/+\-年月日号时点分秒元角]*|[A-Za-z]+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
# Scripts whose text a Latin-script voice cannot read, and the language a voice for it needs
# (the most spoken one that writes it), checked in this order: kana before the Han characters
# Japanese shares with Chinese.
_SCRIPTS = [
    (_KANA, "ja"),
    (_HANGUL, "ko"),
    (_CJK, "zh"),
    (re.compile(r"[\u0600-\u06ff\u0750-\u077f\ufb50-\ufdff\ufe70-\ufeff]"), "ar"),
    (re.compile(r"[\u0400-\u04ff]"), "ru"),
    (re.compile(r"[\u0590-\u05ff]"), "he"),
    (re.compile(r"[\u0370-\u03ff\u1f00-\u1fff]"), "el"),
    (re.compile(r"[\u0e00-\u0e7f]"), "th"),
    (re.compile(r"[\u0900-\u097f]"), "hi"),
    (re.compile(r"[\u0980-\u09ff]"), "bn"),
    (re.compile(r"[\u0b80-\u0bff]"), "ta"),
    (re.compile(r"[\u10a0-\u10ff]"), "ka"),
    (re.compile(r"[\u0530-\u058f]"), "hy"),
]
_WORD = re.compile(r"[^\W_]", re.UNICODE)

# The first piece is kept short so the first audio comes quickly: about this many words
# (Western) or characters (CJK) before it is cut at a clause mark, or failing that at a space.
FIRST_PIECE_WORDS = 5
FIRST_PIECE_CJK_CHARS = 10


def normalize(text: str) -> str:
    """What should be read aloud: no markdown syntax, emoji, URLs, HTML tags or control characters
    (the chat proxy's speakable filter over the whole text, so both read markdown alike)."""
    speakable = SpeakableFilter()
    text = speakable.feed(_CONTROL.sub(" ", text)) + speakable.flush()
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def pieces(text: str) -> list[str]:
    """Normalized text cut into sentences, the first one shortened to a clause: each piece is
    synthesized and streamed on its own, so the first audio never waits for the whole text."""
    sentences = [s.strip() for s in _sentences(normalize(text))]
    sentences = [s for s in sentences if s and _WORD.search(s)]
    if not sentences:
        return []
    head, rest = _split_first(sentences[0])
    return [head, *([rest] if rest else []), *sentences[1:]]


def _sentences(text: str) -> list[str]:
    out: list[str] = []
    start = 0
    for end in _SENTENCE_END.finditer(text):
        if end.group().startswith(".") and _ABBREVIATION.search(text[start : end.start() + 1]):
            continue
        out.append(text[start : end.end()])
        start = end.end()
    out.append(text[start:])
    return out


def _split_first(sentence: str) -> tuple[str, str]:
    cjk = bool(_CJK.search(sentence) or _KANA.search(sentence) or _HANGUL.search(sentence))
    limit = FIRST_PIECE_CJK_CHARS if cjk else FIRST_PIECE_WORDS
    if _length(sentence, cjk) <= limit * 3 // 2:
        return sentence, ""
    # The first clause mark past a few words, if it comes before twice the limit.
    for match in _CLAUSE_END.finditer(sentence):
        head = sentence[: match.start() + 1].strip()
        if _length(head, cjk) >= limit // 2:
            if _length(head, cjk) <= limit * 2:
                return head, sentence[match.end() :].strip()
            break
    if cjk:
        cut = next((run.end() for run in _RUN.finditer(sentence) if run.start() < limit < run.end()), limit)
        return sentence[:cut].strip(), sentence[cut:].strip()
    words = sentence.split(" ")
    return " ".join(words[:limit]), " ".join(words[limit:])


def _length(text: str, cjk: bool) -> int:
    return len(text) if cjk else len(text.split())


def language(text: str) -> str | None:
    """The language a piece needs when it is not the voice's own ('zh', 'ja', 'ar', 'ru', ...:
    see `_SCRIPTS`), or None for text any voice can read (Latin script, digits)."""
    for script, family in _SCRIPTS:
        if script.search(text):
            return family
    return None
