"""A document into a base: read (`extract`), cut (`chunking`), embedded when the base has an
embedder, stored in one transaction (`store.put_document`). The admin API and the CLI both come
here. Reading and cutting run in a thread, so a large document does not stop live rounds."""

from __future__ import annotations

import asyncio
import hashlib
import re

from sqlalchemy.exc import IntegrityError

from core.db import Database
from core.errors import ApiError, bad_request
from knowledge import store
from knowledge.chunking import Chunk, chunk_document
from knowledge.embeddings import Embedder, EmbeddingError
from knowledge.extract import clean_line, extract, media_type
from knowledge.models import DOC_ID_MAX_CHARS, NAME_MAX_CHARS

_BASE_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._\-]{{0,{NAME_MAX_CHARS - 1}}}$")
_DOC_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._\-]{{0,{DOC_ID_MAX_CHARS - 1}}}$")
TITLE_MAX_CHARS = 200


def _plain_name(value: str, pattern: re.Pattern[str], what: str, most: int, code: str) -> str:
    if not pattern.match(value):
        raise bad_request(
            f"{what} is 1-{most} letters, digits, '.', '_' or '-', starting with a letter or digit; not {value[:80]!r}.",
            code,
        )
    return value


def check_base(name: str) -> str:
    return _plain_name(name, _BASE_NAME, "A knowledge base's name", NAME_MAX_CHARS, "invalid_base_name")


def check_doc_id(doc_id: str) -> str:
    return _plain_name(doc_id, _DOC_ID, "A document id", DOC_ID_MAX_CHARS, "invalid_document_id")


def doc_id_for(filename: str) -> str:
    """A document id made from a file name (the CLI's default): its stem, cleaned."""
    stem = re.sub(r"[^A-Za-z0-9._\-]+", "-", filename.rsplit("/", 1)[-1]).strip("-.")
    return (stem or "document")[:DOC_ID_MAX_CHARS]


def _prepared(body: bytes, content_type: str, title: str | None) -> tuple[str | None, int, list[Chunk]]:
    extracted = extract(body, content_type)
    chosen = clean_line(title or extracted.title or "")[:TITLE_MAX_CHARS] or None
    return chosen, len(extracted.text), chunk_document(extracted.text, chosen)


async def ingest(
    db: Database, base: str, doc_id: str, body: bytes, content_type: str, *,
    title: str | None = None, embedder: Embedder | None = None, max_bytes: int,
) -> dict[str, object]:
    """Store the document (replacing one of the same id); what was stored. Errors are `ApiError`s
    with the status the admin API answers (413, 415, 400, 502 for a failing embedder)."""
    check_base(base)
    check_doc_id(doc_id)
    kind = media_type(content_type)
    if len(body) > max_bytes:
        raise ApiError(413, f"The document is {len(body)} bytes; a document is at most {max_bytes} bytes "
                       "(KNOWLEDGE_MAX_DOCUMENT_MB).", "invalid_request_error", "document_too_large")
    chosen, chars, chunks = await asyncio.to_thread(_prepared, body, content_type, title)
    embeddings = None
    if embedder is not None:
        try:
            embeddings = await embedder.embed_documents([chunk.indexed for chunk in chunks])
        except EmbeddingError as exc:
            raise ApiError(502, f"The base's embeddings upstream failed: {exc}. Nothing was stored.",
                           "upstream_error", "embeddings_failed") from None
    doc = store.NewDocument(
        base=base, id=doc_id, title=chosen, content_type=kind, bytes=len(body), chars=chars,
        sha256=hashlib.sha256(body).hexdigest(), chunks=chunks, embeddings=embeddings,
        embedding_model=embedder.model if embedder is not None else None,
    )
    try:
        return await db.run_in_background(store.put_document, doc)
    except IntegrityError:
        # Another process created the same new base (or document) at the same moment: once
        # more, now that the row exists.
        return await db.run_in_background(store.put_document, doc)
