"""Documents cut along their structure into passages a model can read one at a time.

A chunk never crosses a heading and carries its heading path ("Billing > Refunds"); paragraphs
are packed together up to `TARGET` characters; a paragraph longer than `LIMIT` is cut between
sentences (Chinese 。！？； as well as .!?;), the next piece repeating the previous one's last
sentence when it is short (the overlap); a sentence longer than `LIMIT` is cut hard. A FAQ
written as question/answer pairs ("Q:"/"A:", "问："/"答：") stays one pair per chunk. A chunk's id is
the hash of its heading path and text, so the same text ingested again gets the same ids.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

TARGET = 400
LIMIT = 500
OVERLAP = 80
# A question/answer pair is kept whole up to this many characters, then cut like a paragraph.
PAIR_LIMIT = 2 * LIMIT

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_QUESTION = re.compile(r"^\s*(?:\*\*)?(?:Q\s*\d*\s*[:：.]|问\s*[:：]|问题\s*[:：]|Question\s*\d*\s*[:：])", re.IGNORECASE)
# After a sentence end: Chinese punctuation (with closing quotes), or Western punctuation
# followed by a space; or a line break.
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;][”’」』）)])|(?<=[。！？；])|(?<=[.!?;])(?=\s)|\n")


@dataclass(frozen=True)
class Chunk:
    id: str
    heading: str
    text: str

    @property
    def indexed(self) -> str:
        """What search reads: the heading path counts as much as the text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


@dataclass(frozen=True)
class _Unit:
    text: str
    pair: bool = False


def chunk_document(text: str, title: str | None = None) -> list[Chunk]:
    """The document's chunks in reading order. `title` heads the heading path of every chunk
    when the document has no heading of its own above it."""
    chunks: list[Chunk] = []
    seen: dict[str, int] = {}
    for path, body in _sections(text, title):
        heading = " > ".join(path)
        for piece in _pack(_units(body)):
            base_id = hashlib.sha1(f"{heading}\n{piece}".encode()).hexdigest()[:16]
            seen[base_id] = seen.get(base_id, 0) + 1
            chunk_id = base_id if seen[base_id] == 1 else f"{base_id}-{seen[base_id]}"
            chunks.append(Chunk(chunk_id, heading, piece))
    return chunks


def _sections(text: str, title: str | None) -> list[tuple[list[str], list[str]]]:
    """(heading path, body lines) of each part of the document between two headings."""
    sections: list[tuple[list[str], list[str]]] = []
    levels: list[tuple[int, str]] = []
    body: list[str] = []

    def path() -> list[str]:
        names = [name for _level, name in levels] or ([title] if title else [])
        return [name[:200] for name in names]

    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced  # a `# comment` in a code block is no heading
        match = None if fenced else _HEADING.match(line)
        if match is None:
            body.append(line)
            continue
        if any(part.strip() for part in body):
            sections.append((path(), body))
        body = []
        level = len(match.group(1))
        levels = [(lvl, name) for lvl, name in levels if lvl < level]
        levels.append((level, match.group(2).strip()))
    if any(part.strip() for part in body):
        sections.append((path(), body))
    return sections


def _units(lines: list[str]) -> list[_Unit]:
    """Paragraphs (split at blank lines), with each question joined to its answer."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    units: list[_Unit] = []
    for paragraph in paragraphs:
        if _QUESTION.match(paragraph):
            units.append(_Unit(paragraph, pair=True))
        elif units and units[-1].pair and not _QUESTION.match(paragraph):
            units[-1] = _Unit(f"{units[-1].text}\n{paragraph}", pair=True)
        else:
            units.append(_Unit(paragraph))
    return units


def _pack(units: list[_Unit]) -> list[str]:
    """Units into chunks: short ones together up to TARGET (LIMIT when the chunk so far is
    small), a pair alone, a long one cut between sentences."""
    out: list[str] = []
    current = ""
    for unit in units:
        if unit.pair and len(unit.text) <= PAIR_LIMIT:
            if current:
                out.append(current)
                current = ""
            out.append(unit.text)
            continue
        if len(unit.text) > LIMIT:
            if current:
                out.append(current)
                current = ""
            out += _cut(unit.text)
            continue
        joined = f"{current}\n{unit.text}" if current else unit.text
        if len(joined) <= TARGET or (len(current) < TARGET // 2 and len(joined) <= LIMIT):
            current = joined
        else:
            out.append(current)
            current = unit.text
    if current:
        out.append(current)
    return out


def _cut(text: str) -> list[str]:
    """A long paragraph in pieces of at most LIMIT characters, between sentences where it can,
    each piece after the first opening with its predecessor's last sentence if that is short."""
    sentences = [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for sentence in sentences:
        while len(sentence) > LIMIT:
            if current:
                pieces.append(" ".join(current) if _latin(current) else "".join(current))
                current, size = [], 0
            pieces.append(sentence[:TARGET])
            sentence = sentence[TARGET:]
        if current and size + len(sentence) > TARGET:
            pieces.append(" ".join(current) if _latin(current) else "".join(current))
            last = current[-1]
            current, size = ([last], len(last)) if len(last) <= OVERLAP and len(last) + len(sentence) <= LIMIT else ([], 0)
        current.append(sentence)
        size += len(sentence)
    if current:
        pieces.append(" ".join(current) if _latin(current) else "".join(current))
    return pieces


def _latin(sentences: list[str]) -> bool:
    """Whether sentences are joined with spaces (Western text) or without (Chinese)."""
    sample = sentences[0]
    return bool(sample) and sample[-1] in ".!?;:," or sample.isascii()
