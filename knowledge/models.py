"""Knowledge's tables: named bases, their documents, and each document's chunks.

A base's `version` is bumped by every change to its documents, so each process's in-memory
index (`knowledge.search.Knowledge`) knows when to read it again. Chunks hold their text and
heading path as stored; the lexical index is built from them in each process, never stored.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKeyConstraint, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base

# Base names and document ids: plain names, so that they sit in URLs and paths unescaped.
NAME_MAX_CHARS = 64
DOC_ID_MAX_CHARS = 128


class KnowledgeBase(Base):
    __tablename__ = "knowledge_bases"

    name: Mapped[str] = mapped_column(String(NAME_MAX_CHARS), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    documents: Mapped[int] = mapped_column(Integer, default=0)
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    # The embeddings model its chunks were embedded with (None: lexical only).
    embedding_model: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class KnowledgeDocument(Base):
    __tablename__ = "knowledge_documents"
    __table_args__ = (
        ForeignKeyConstraint(["base"], ["knowledge_bases.name"], ondelete="CASCADE"),
    )

    base: Mapped[str] = mapped_column(String(NAME_MAX_CHARS), primary_key=True)
    id: Mapped[str] = mapped_column(String(DOC_ID_MAX_CHARS), primary_key=True)
    title: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(64))
    # Size of the upload, characters of text taken from it, chunks made of that text.
    bytes: Mapped[int] = mapped_column(Integer)
    chars: Mapped[int] = mapped_column(Integer)
    chunks: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class KnowledgeChunk(Base):
    __tablename__ = "knowledge_chunks"
    __table_args__ = (
        ForeignKeyConstraint(
            ["base", "document"], ["knowledge_documents.base", "knowledge_documents.id"], ondelete="CASCADE"
        ),
    )

    base: Mapped[str] = mapped_column(String(NAME_MAX_CHARS), primary_key=True)
    document: Mapped[str] = mapped_column(String(DOC_ID_MAX_CHARS), primary_key=True)
    # Its place in the document; the id is the hash of its heading path and text (stable across
    # re-ingestion of the same text).
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[str] = mapped_column(String(32))
    heading: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    # float32 little-endian, when the base has an embeddings upstream.
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
