"""Knowledge bases in SQL: plain functions of a connection, each run in one transaction
(`Database.run`). Every change bumps its base's `version`, which each process polls."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from admin.queries import as_utc
from knowledge.chunking import Chunk
from knowledge.models import KnowledgeBase, KnowledgeChunk, KnowledgeDocument

# Chunk rows per INSERT: bounded statements whatever the document's size.
_INSERT_BATCH = 500


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment is not None else None


@dataclass(frozen=True)
class NewDocument:
    base: str
    id: str
    title: str | None
    content_type: str
    bytes: int
    chars: int
    sha256: str
    chunks: Sequence[Chunk]
    # One per chunk (float32 bytes) when the base has an embedder; else None.
    embeddings: Sequence[builtins.bytes] | None = None
    embedding_model: str | None = None


def put_document(conn: Connection, doc: NewDocument) -> dict[str, Any]:
    """Create or replace the document and its chunks, the base with it if new."""
    now = _now()
    base = conn.execute(
        select(KnowledgeBase.name).where(KnowledgeBase.name == doc.base).with_for_update()
    ).first()
    if base is None:
        conn.execute(insert(KnowledgeBase).values(
            name=doc.base, version=1, documents=0, chunks=0, embedding_model=doc.embedding_model,
            created_at=now, updated_at=now,
        ))
    old = conn.execute(
        select(KnowledgeDocument.created_at).where(KnowledgeDocument.base == doc.base, KnowledgeDocument.id == doc.id)
    ).first()
    if old is not None:
        conn.execute(delete(KnowledgeChunk).where(KnowledgeChunk.base == doc.base, KnowledgeChunk.document == doc.id))
        conn.execute(delete(KnowledgeDocument).where(KnowledgeDocument.base == doc.base, KnowledgeDocument.id == doc.id))
    conn.execute(insert(KnowledgeDocument).values(
        base=doc.base, id=doc.id, title=doc.title, content_type=doc.content_type, bytes=doc.bytes, chars=doc.chars,
        chunks=len(doc.chunks), sha256=doc.sha256, created_at=old[0] if old else now, updated_at=now,
    ))
    rows = [
        {"base": doc.base, "document": doc.id, "seq": seq, "id": chunk.id, "heading": chunk.heading, "text": chunk.text,
         "embedding": doc.embeddings[seq] if doc.embeddings is not None else None}
        for seq, chunk in enumerate(doc.chunks)
    ]
    for start in range(0, len(rows), _INSERT_BATCH):
        conn.execute(insert(KnowledgeChunk), rows[start : start + _INSERT_BATCH])
    _recount(conn, doc.base, now, embedding_model=doc.embedding_model)
    return {"base": doc.base, "id": doc.id, "title": doc.title, "content_type": doc.content_type, "bytes": doc.bytes,
            "chars": doc.chars, "chunks": len(doc.chunks), "sha256": doc.sha256, "replaced": old is not None,
            "embedded": doc.embeddings is not None}


def _recount(conn: Connection, base: str, now: datetime, **values: Any) -> None:
    counts = select(func.count(), func.coalesce(func.sum(KnowledgeDocument.chunks), 0)).where(KnowledgeDocument.base == base)
    documents, chunks = conn.execute(counts).one()
    conn.execute(
        update(KnowledgeBase).where(KnowledgeBase.name == base)
        .values(version=KnowledgeBase.version + 1, documents=documents, chunks=chunks, updated_at=now, **values)
    )


def delete_document(conn: Connection, base: str, doc_id: str) -> bool:
    conn.execute(delete(KnowledgeChunk).where(KnowledgeChunk.base == base, KnowledgeChunk.document == doc_id))
    gone = conn.execute(
        delete(KnowledgeDocument).where(KnowledgeDocument.base == base, KnowledgeDocument.id == doc_id)
    ).rowcount
    if gone:
        _recount(conn, base, _now())
    return bool(gone)


def delete_base(conn: Connection, base: str) -> int | None:
    """Delete the base with its documents; their number, or None when there was no such base.
    Chunks and documents go by cascade (and explicitly, for a SQLite file whose foreign keys
    were off when it was written)."""
    documents = conn.execute(select(KnowledgeBase.documents).where(KnowledgeBase.name == base)).scalar_one_or_none()
    if documents is None:
        return None
    conn.execute(delete(KnowledgeChunk).where(KnowledgeChunk.base == base))
    conn.execute(delete(KnowledgeDocument).where(KnowledgeDocument.base == base))
    conn.execute(delete(KnowledgeBase).where(KnowledgeBase.name == base))
    return int(documents)


def list_bases(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(select(KnowledgeBase.__table__).order_by(KnowledgeBase.name)).mappings().all()
    return [
        {"name": r["name"], "documents": r["documents"], "chunks": r["chunks"], "embedding_model": r["embedding_model"],
         "version": r["version"], "created_at": _iso(r["created_at"]), "updated_at": _iso(r["updated_at"])}
        for r in rows
    ]


def _document(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "title": row["title"], "content_type": row["content_type"], "bytes": row["bytes"],
            "chars": row["chars"], "chunks": row["chunks"], "sha256": row["sha256"],
            "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"])}


def list_documents(conn: Connection, base: str) -> list[dict[str, Any]] | None:
    if conn.execute(select(KnowledgeBase.name).where(KnowledgeBase.name == base)).first() is None:
        return None
    rows = conn.execute(
        select(KnowledgeDocument.__table__).where(KnowledgeDocument.base == base).order_by(KnowledgeDocument.id)
    ).mappings().all()
    return [_document(r) for r in rows]


def get_document(conn: Connection, base: str, doc_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        select(KnowledgeDocument.__table__).where(KnowledgeDocument.base == base, KnowledgeDocument.id == doc_id)
    ).mappings().first()
    if row is None:
        return None
    chunks = conn.execute(
        select(KnowledgeChunk.seq, KnowledgeChunk.id, KnowledgeChunk.heading, KnowledgeChunk.text,
               KnowledgeChunk.embedding.is_not(None))
        .where(KnowledgeChunk.base == base, KnowledgeChunk.document == doc_id).order_by(KnowledgeChunk.seq)
    ).all()
    return {**_document(row), "base": base, "chunks": [
        {"seq": seq, "id": chunk_id, "heading": heading, "text": text, "embedded": bool(embedded)}
        for seq, chunk_id, heading, text, embedded in chunks
    ]}


def versions(conn: Connection) -> dict[str, int]:
    """Every base's version: what each process polls."""
    return {name: version for name, version in conn.execute(select(KnowledgeBase.name, KnowledgeBase.version))}


@dataclass(frozen=True)
class BaseState:
    version: int
    embedding_model: str | None
    # Document id -> (sha256, updated_at) as stored.
    documents: dict[str, tuple[str, str]]


def base_state(conn: Connection, base: str) -> BaseState | None:
    row = conn.execute(
        select(KnowledgeBase.version, KnowledgeBase.embedding_model).where(KnowledgeBase.name == base)
    ).first()
    if row is None:
        return None
    documents = {
        doc_id: (sha, _iso(updated) or "")
        for doc_id, sha, updated in conn.execute(
            select(KnowledgeDocument.id, KnowledgeDocument.sha256, KnowledgeDocument.updated_at)
            .where(KnowledgeDocument.base == base)
        )
    }
    return BaseState(row[0], row[1], documents)


# Chunk rows per read: a large document is read in short transactions, between which live
# rounds' own transactions go (on SQLite they share one connection).
READ_PAGE = 400


def document_chunks(
    conn: Connection, base: str, doc_id: str, after_seq: int = -1
) -> list[tuple[int, Chunk, builtins.bytes | None]]:
    """The document's next `READ_PAGE` chunks after `after_seq` (seq, chunk, embedding)."""
    rows = conn.execute(
        select(KnowledgeChunk.seq, KnowledgeChunk.id, KnowledgeChunk.heading, KnowledgeChunk.text,
               KnowledgeChunk.embedding)
        .where(KnowledgeChunk.base == base, KnowledgeChunk.document == doc_id, KnowledgeChunk.seq > after_seq)
        .order_by(KnowledgeChunk.seq)
        .limit(READ_PAGE)
    )
    return [(seq, Chunk(chunk_id, heading, text), embedding) for seq, chunk_id, heading, text, embedding in rows]
