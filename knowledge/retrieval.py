"""The knowledge bases this process searches, indexed in its memory, and search over them.

A process indexes the bases its profiles list (`in_use`) and those the admin API searched in it.
While it has any, it reads the bases' versions every `POLL_S` (a process without knowledge reads
nothing); a base that changed is read again, but only its documents whose stamp changed, and its
index is rebuilt in a thread and swapped in whole.
A delete or a replacement made by any process thus reaches every process within a second (the
process that made it applies it at once). Searching is in memory and on the event loop: a
query against 10,000 chunks takes well under a millisecond (`bench/knowledge_bench.py`), less
than a hop to a thread and back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from core.db import Database
from core.metrics import KNOWLEDGE_LEXICAL_ONLY
from knowledge import store
from knowledge.chunking import Chunk
from knowledge.embeddings import Embedder, EmbeddingError
from knowledge.index import BaseIndex, Vocabulary, fuse, tokenize

log = logging.getLogger("trtc.knowledge")

POLL_S = 0.5
# While the database cannot be read, a warning at most this often.
_FAILURE_LOG_S = 60.0
# Candidates each ranking gives fusion, per requested result.
_CANDIDATES_PER_RESULT = 4
MAX_TOP_K = 50
MAX_QUERY_CHARS = 2000
# Bases this large (in all, of one search) are searched in a thread: at 100,000 chunks a search
# takes ~5 ms (`bench/knowledge_bench.py`), long enough to stall every stream in flight.
_THREAD_FROM_CHUNKS = 20_000


@dataclass(frozen=True)
class Passage:
    base: str
    document: str
    chunk: str
    heading: str
    text: str
    score: float

    def record(self) -> dict[str, object]:
        """How a round stores the passage it used."""
        return {"base": self.base, "document": self.document, "chunk": self.chunk, "score": round(self.score, 4)}

    def result(self) -> dict[str, object]:
        """How the admin API's search answers it."""
        return {"base": self.base, "document": self.document, "chunk": self.chunk, "heading": self.heading,
                "text": self.text, "score": round(self.score, 4)}


class Knowledge:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.vocabulary = Vocabulary()
        self._indexes: dict[str, BaseIndex] = {}
        self._versions: dict[str, int] = {}
        # Base name -> its embedder (from the profiles file's `knowledge_bases`), and the bases the
        # profiles list; both replaced on reload.
        self.embedders: Mapping[str, Embedder] = {}
        self.in_use: frozenset[str] = frozenset()
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the bases now and then poll; a database that cannot be read yet (down, or not
        migrated: the health check says so) is read again at the next poll."""
        self._poller = asyncio.create_task(self._poll(), name="knowledge-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass

    async def _poll(self) -> None:
        failing_since: float | None = None
        while True:
            try:
                if self.in_use or self._indexes:
                    await self.refresh()
                failing_since = None
            except Exception as exc:  # a database that is down now is read again next time
                if failing_since is None or time.monotonic() - failing_since > _FAILURE_LOG_S:
                    failing_since = time.monotonic()
                    log.warning("knowledge bases not refreshed: %s: %s", type(exc).__name__, str(exc)[:300])
            await asyncio.sleep(POLL_S)

    def bases(self) -> dict[str, int]:
        return {name: index.size for name, index in self._indexes.items()}

    def index(self, base: str) -> BaseIndex | None:
        return self._indexes.get(base)

    async def refresh(self, only: str | None = None) -> None:
        """Read what changed since the last look in the bases in use or indexed here (only
        `only`, when given: after this process changed it, or to search it)."""
        async with self._lock:
            current = await self.db.run(store.versions)
            for name in [n for n in self._indexes if n not in current]:
                del self._indexes[name]
                self._versions.pop(name, None)
            for name, version in current.items():
                wanted = name == only if only is not None else name in self.in_use or name in self._indexes
                if wanted and self._versions.get(name) != version:
                    await self._load(name)

    async def _load(self, base: str) -> None:
        state = await self.db.run(store.base_state, base)
        if state is None:
            self._indexes.pop(base, None)
            self._versions.pop(base, None)
            return
        started = time.perf_counter()
        old = self._indexes.get(base, BaseIndex())
        if old.embedding_model != state.embedding_model:
            old = BaseIndex()  # embedded with another model: every chunk is read again
        removed = {doc for doc, stamp in old.documents.items() if state.documents.get(doc) != stamp}
        changed = [doc for doc, stamp in state.documents.items() if old.documents.get(doc) != stamp]
        added = [(doc, state.documents[doc], await self._chunks(base, doc)) for doc in changed]
        self._indexes[base] = await asyncio.to_thread(
            old.replaced, self.vocabulary, removed, added, state.embedding_model
        )
        self._versions[base] = state.version
        log.info("knowledge base %s: %d chunks (%d documents read) in %.0f ms", base, self._indexes[base].size,
                 len(changed), (time.perf_counter() - started) * 1000)

    async def _chunks(self, base: str, doc: str) -> list[tuple[int, Chunk, bytes | None]]:
        """A document's chunks, a page at a time (on SQLite on the database's thread, off the event
        loop)."""
        chunks: list[tuple[int, Chunk, bytes | None]] = []
        while True:
            page = await self.db.run_in_background(store.document_chunks, base, doc, chunks[-1][0] if chunks else -1)
            chunks += page
            if len(page) < store.READ_PAGE:
                return chunks

    async def search(self, bases: Sequence[str], query: str, top_k: int, min_score: float = 0.0,
                     *, terms: Sequence[str] | None = None) -> list[Passage]:
        """The best `top_k` passages of these bases for the query, scored 0..1. `terms`: the
        query's terms when the caller weighed them itself (a follow-up with the turn before it).
        Bases with an embedder are searched both ways and fused; an embedder that fails or is
        slower than its `timeout_ms` leaves that base to lexical search."""
        terms = list(terms) if terms is not None else tokenize(query[:MAX_QUERY_CHARS])
        vectors = await self._query_vectors(bases, query[:MAX_QUERY_CHARS])
        indexes = [self._indexes.get(base) for base in bases]
        if sum(index.size for index in indexes if index is not None) >= _THREAD_FROM_CHUNKS:
            return await asyncio.to_thread(self._ranked, bases, terms, vectors, top_k, min_score)
        return self._ranked(bases, terms, vectors, top_k, min_score)

    def _ranked(self, bases: Sequence[str], terms: Sequence[str], vectors: dict[str, np.ndarray], top_k: int,
                min_score: float) -> list[Passage]:
        limit = max(top_k * _CANDIDATES_PER_RESULT, 20)
        found: list[Passage] = []
        for base in bases:
            index = self._indexes.get(base)
            if index is None:
                continue
            ranked = index.lexical(self.vocabulary, terms, limit)
            vector = vectors.get(base)
            if vector is not None:
                ranked = fuse([ranked, index.dense(vector, limit)], limit)
            for position, score in ranked[:top_k]:
                if score < min_score or score <= 0:
                    continue
                entry = index.entries[position]
                found.append(Passage(base, entry.document, entry.chunk.id, entry.chunk.heading, entry.chunk.text, score))
        found.sort(key=lambda p: -p.score)
        return found[:top_k]

    async def _query_vectors(self, bases: Sequence[str], query: str) -> dict[str, np.ndarray]:
        """The query's embedding for each base that has one with the model its chunks were
        embedded with (one request per embedder, all at once)."""
        wanted: dict[int, tuple[Embedder, list[str]]] = {}
        for base in bases:
            embedder = self.embedders.get(base)
            index = self._indexes.get(base)
            if embedder is None or index is None or index.vectors is None or index.embedding_model != embedder.model:
                continue
            wanted.setdefault(id(embedder), (embedder, []))[1].append(base)
        if not wanted or not query.strip():
            return {}
        pairs = list(wanted.values())
        answers = await asyncio.gather(*(embedder.embed_query(query) for embedder, _ in pairs), return_exceptions=True)
        vectors: dict[str, np.ndarray] = {}
        for (embedder, names), answer in zip(pairs, answers):
            if isinstance(answer, EmbeddingError):
                KNOWLEDGE_LEXICAL_ONLY.labels(embedder.model).inc()
                log.warning("embeddings for %s: %s; searching lexically this time", ", ".join(names), answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                vectors.update({name: answer for name in names})
        return vectors

