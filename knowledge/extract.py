"""Text out of an uploaded document, in a Markdown-like form the chunker reads: `#` headings,
blank lines between paragraphs. Plain text and Markdown pass through; HTML keeps its headings,
paragraphs and list items and loses scripts, styles and navigation; a PDF gives its pages' text.

A document that cannot be read is an `ExtractError` with the status the admin API answers.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from core.errors import ApiError

log = logging.getLogger("trtc.knowledge")

# The media types taken, and what each is read as.
TYPES = {
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/pdf": "pdf",
}
# Pages of a PDF read at most: a hostile file can claim millions.
MAX_PDF_PAGES = 2000


@dataclass(frozen=True)
class Extracted:
    text: str
    # The document's own title (HTML <title>, PDF metadata), when it has one.
    title: str | None = None


def media_type(content_type: str | None) -> str:
    """The upload's media type, without parameters; 415 for one this server does not read."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind not in TYPES:
        raise ApiError(
            415,
            f"Content-Type {kind[:80] or '(none)'!r} is not one a knowledge base takes: "
            f"{', '.join(sorted(set(TYPES) - {'text/x-markdown', 'application/xhtml+xml'}))}.",
            "invalid_request_error",
            "unsupported_media_type",
        )
    return kind


def extract(body: bytes, content_type: str) -> Extracted:
    """The document's text (CPU-bound: run it in a thread). 400 for a file that is not what its
    type says, or that holds no text."""
    kind = TYPES[media_type(content_type)]
    if kind == "pdf":
        extracted = _pdf(body)
    else:
        text = _decode(body, content_type)
        extracted = _html(text) if kind == "html" else Extracted(text)
    cleaned = _tidy(extracted.text)
    if not cleaned.strip():
        raise ApiError(400, "The document holds no text.", "invalid_request_error", "no_text")
    return Extracted(cleaned, extracted.title)


def _decode(body: bytes, content_type: str) -> str:
    """UTF-8 (with or without BOM), the charset the type names, or GB18030 (which Chinese
    documents saved on Windows are in); 400 otherwise."""
    charset = re.search(r"charset=([\w\-]+)", content_type, re.IGNORECASE)
    for encoding in (charset.group(1) if charset else "utf-8-sig", "utf-8-sig", "gb18030"):
        try:
            return body.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
    raise ApiError(400, "The document is not text in UTF-8 (or GB18030).", "invalid_request_error", "undecodable_text")


def clean_line(text: str) -> str:
    """A one-line value (a title) as it can be stored on both databases."""
    return " ".join(_tidy(text).split())


def _tidy(text: str) -> str:
    """Line ends unified, NUL and other control characters out (PostgreSQL refuses NUL), runs
    of blank lines shortened."""
    # Lone surrogates (a broken PDF's text can hold them) are not UTF-8: PostgreSQL refuses them.
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _pdf(body: bytes) -> Extracted:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if not body.lstrip()[:5].startswith(b"%PDF-"):
        raise ApiError(400, "The document is not a PDF (no %PDF- header).", "invalid_request_error", "invalid_pdf")
    try:
        reader = PdfReader(io.BytesIO(body))
        if reader.is_encrypted:
            raise ApiError(400, "The PDF is encrypted; upload it without a password.", "invalid_request_error", "invalid_pdf")
        pages = []
        for number, page in enumerate(reader.pages):
            if number >= MAX_PDF_PAGES:
                break
            pages.append(page.extract_text() or "")
        title = reader.metadata.title if reader.metadata else None
    except ApiError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        # pypdf meets a broken file with many kinds of error; each is the file's fault.
        log.info("unreadable PDF: %s: %s", type(exc).__name__, exc)
        raise ApiError(400, f"The PDF cannot be read ({type(exc).__name__}).", "invalid_request_error", "invalid_pdf") from None
    return Extracted("\n\n".join(pages), str(title) if title else None)


class _HtmlText(HTMLParser):
    """HTML to headings and paragraphs; what is not content (scripts, styles, navigation,
    headers and footers of the page, forms) is dropped with everything inside it."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "nav", "header", "footer", "form", "svg", "iframe", "head"})
    _BLOCK = frozenset({"p", "div", "section", "article", "main", "li", "tr", "br", "table", "ul", "ol", "dl", "dt", "dd",
                        "blockquote", "pre", "figure", "figcaption", "hr", "aside"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.title: str | None = None
        self._skipping = 0
        self._in_title = False
        self._title: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in self._SKIP:
            self._skipping += 1
        elif not self._skipping and re.fullmatch(r"h[1-6]", tag):
            self.out.append("\n\n" + "#" * int(tag[1]) + " ")
        elif not self._skipping and tag in self._BLOCK:
            self.out.append("\n\n" if tag != "li" else "\n\n- ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
            self.title = " ".join("".join(self._title).split()) or None
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif not self._skipping and (re.fullmatch(r"h[1-6]", tag) or tag in self._BLOCK):
            self.out.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title.append(data)
        if not self._skipping:
            self.out.append(re.sub(r"\s+", " ", data))


def _html(text: str) -> Extracted:
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    lines = [line.strip() for line in "".join(parser.out).split("\n")]
    return Extracted("\n".join(lines), parser.title)
