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
_LATIN = re.compile(r"[0-9A-Za-z\u00c0-\u024f\u1e00-\u1eff]")

# The first piece is kept short so the first audio comes quickly: about this many words
# (Western) or characters (CJK) before it is cut at a clause mark, or failing that at a space.
FIRST_PIECE_WORDS = 5
FIRST_PIECE_CJK_CHARS = 10

# The most any piece may weigh (`weight`: about the characters the voice is given once numbers
# are written out). piper's memory grows with the audio of one call (about 18 MB a second) and
# its time faster than linearly (800 characters: 2.8 s and 600 MB), so every piece is cut to
# this: about 5 s of speech, under 0.3 s of one core. (The engine bounds what the grammars make
# of a piece again, by phonemes: `voices.MAX_PHONEMES`.)
MAX_PIECE_WEIGHT = 100
# A digit is read as a word ("nine "), a CJK character as a syllable of several phonemes.
_DIGIT_WEIGHT = 6
_CJK_WEIGHT = 3
# Runs of more digits than this are not a number anyone says: they are read in groups of four.
_LONGEST_NUMBER = 15
_NUMBER = re.compile(r"\d(?:[\d,.]*\d)?")
_CJK_ANY = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def normalize(text: str) -> str:
    """What should be read aloud: no markdown syntax, emoji, URLs, HTML tags or control characters
    (the chat proxy's speakable filter over the whole text, so both read markdown alike)."""
    speakable = SpeakableFilter()
    text = speakable.feed(_CONTROL.sub(" ", text)) + speakable.flush()
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def pieces(text: str) -> list[str]:
    """Normalized text cut into sentences, the first one shortened to a clause, and every piece
    cut to `MAX_PIECE_WEIGHT`: each piece is synthesized and streamed on its own, so the first
    audio never waits for the whole text, and no piece can make the engine eat the machine."""
    sentences = [s.strip() for s in _sentences(_group_long_numbers(normalize(text)))]
    sentences = [s for s in sentences if s and _WORD.search(s)]
    if not sentences:
        return []
    head, rest = _split_first(sentences[0])
    out: list[str] = []
    for sentence in [head, *([rest] if rest else []), *sentences[1:]]:
        out += [piece for piece in split_by_weight(sentence, MAX_PIECE_WEIGHT) if _WORD.search(piece)]
    return out


def weight(text: str) -> int:
    """About how many characters the voice will be given for `text`: digits count as the word
    each becomes, CJK characters as the phonemes of their syllable."""
    return sum(_char_weight(char) for char in text)


def _char_weight(char: str) -> int:
    return _DIGIT_WEIGHT if char.isdigit() else _CJK_WEIGHT if _CJK_ANY.match(char) else 1


def split_by_weight(text: str, limit: int) -> list[str]:
    """`text` in parts of at most `limit` weight: cut at the last clause mark that fits, else at
    the last space, else (one overlong word, or CJK without marks) where the limit falls, moved
    past a number or Latin word it would split if that is short."""
    out: list[str] = []
    rest = text.strip()
    while (end := _index_at_weight(rest, limit)) < len(rest):
        window = rest[:end]
        marks = [m.end() for m in _CLAUSE_END.finditer(window) if m.end() > end // 3]
        space = window.rfind(" ")
        if marks:
            cut = marks[-1]
        elif space > end // 3:
            cut = space + 1
        else:
            cut = next((run.end() for run in _RUN.finditer(rest) if run.start() < end < run.end() <= end + 12), end)
        out.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        out.append(rest)
    return [part for part in out if part]


def _index_at_weight(text: str, limit: int) -> int:
    """The length of the longest prefix of `text` of at most `limit` weight (at least one
    character): all of it when the whole fits."""
    total = 0
    for index, char in enumerate(text):
        total += _char_weight(char)
        if total > limit:
            return max(index, 1)
    return len(text)


def _group_long_numbers(text: str) -> str:
    """A run of more than `_LONGEST_NUMBER` digits (separators aside) as groups of four digits,
    which the normaliser reads digit by digit, a pause between groups."""

    def grouped(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        if len(digits) <= _LONGEST_NUMBER:
            return match.group()
        return " ".join(digits[i : i + 4] for i in range(0, len(digits), 4))

    return _NUMBER.sub(grouped, text)


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


def readable(text: str) -> bool:
    """Whether some voice can read `text`: it has Latin letters or digits (any voice), or a script
    `language` routes to a voice of its own. Text in any other script (Cherokee, Ethiopic, ...)
    would come out of a Latin voice as no audio at all."""
    return bool(_LATIN.search(text)) or language(text) is not None


def language(text: str) -> str | None:
    """The language a piece needs when it is not the voice's own ('zh', 'ja', 'ar', 'ru', ...:
    see `_SCRIPTS`), or None for text any voice can read (Latin script, digits)."""
    for script, family in _SCRIPTS:
        if script.search(text):
            return family
    return None
