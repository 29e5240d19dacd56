"""A base's search index in memory: BM25 over an inverted index held in numpy arrays, and the
chunks' embeddings (when the base has an embedder) as one matrix.

Chinese is searched by character bigrams and single characters (no segmenter, no dictionary:
`bench/knowledge_bench.py` measures both against bigrams alone), English by words with a light
plural/verb suffix strip. The posting lists are numpy arrays (6 bytes per chunk and distinct
term), so a change is applied without reading the unchanged documents again: their postings are
filtered, the new document's appended, the arrays sorted again, all in numpy.
"""

from __future__ import annotations

import math
import re
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from knowledge.chunking import Chunk

# BM25's parameters (the usual ones).
K1 = 1.2
B = 0.75
# Tokenizing holds the GIL: the thread that does it lets go this often, so the event loop's
# thread (live rounds) waits at most about this long for it, not the interpreter's 5 ms switch
# interval each time it wakes.
_YIELD_S = 0.001

_RUN = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_LATIN_STOP = frozenset(
    "a an and are as at be but by can could do does for from had has have how i if in into is it its me my no not of on "
    "or our so than that the their them then there these they this to was we were what when where which who why will "
    "with would you your".split()
)
# Single characters that say nothing about a topic (they still count inside bigrams).
_CJK_STOP = frozenset("的了是在我你他她它们吗呢吧啊么嘛哦呀和与及或就也都还又很这那有个一不要会能想请问说")
# Words of asking, cut out of Chinese text before it is paired: "有什么要求" would otherwise give
# "什么", "么要" and the like, which match any chatty passage ("有什么可以帮你").
_CJK_QUESTION = re.compile("什么|怎么|怎样|多少|哪些|哪个|哪里|如何|应该|可以|是否|请问|一下|有没有|能不能|是不是|为什么|来着|的话")


def tokenize(text: str, *, unigrams: bool = True) -> list[str]:
    """The terms of a text, in order, repeats kept (term frequency counts them)."""
    terms: list[str] = []
    for run in _RUN.findall(_CJK_QUESTION.sub(" ", unicodedata.normalize("NFKC", text).lower())):
        if run.isascii():
            if run not in _LATIN_STOP:
                terms.append(_stem(run))
            continue
        if len(run) == 1:
            terms.append(run)
            continue
        terms += [run[i : i + 2] for i in range(len(run) - 1)]
        if unigrams:
            terms += [char for char in run if char not in _CJK_STOP]
    return terms


def _stem(word: str) -> str:
    """Plural and verb endings off, and a final e, so that "refunds", "charged", "charging",
    "charge" and "shipping"/"ship" meet ("refund", "charg", "ship"); the same for query and text.
    Numbers and short words stay as they are."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith(("ches", "shes", "xes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # "shipp" -> "ship"
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


class Vocabulary:
    """Term -> id, shared by every base of the process; ids are only ever added."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, terms: Iterable[str]) -> np.ndarray:
        ids = self._ids
        with self._lock:
            return np.fromiter((ids.setdefault(term, len(ids)) for term in terms), dtype=np.int32)

    def known(self, terms: Iterable[str]) -> tuple[np.ndarray, int]:
        """The ids of the terms the vocabulary has, and how many it lacks."""
        found = [self._ids.get(term) for term in terms]
        ids = np.fromiter((i for i in found if i is not None), dtype=np.int32)
        return ids, len(found) - len(ids)


@dataclass(frozen=True)
class Entry:
    """A chunk as search hands it back."""

    document: str
    seq: int
    chunk: Chunk


@dataclass(frozen=True)
class Hit:
    entry: Entry
    # 0..1: for BM25 the share of the best score any chunk could have had for this query, for
    # embeddings the cosine similarity; fused, the higher of the two.
    score: float


@dataclass
class BaseIndex:
    """One base's chunks and their postings; replaced whole (never changed) when the base changes,
    so a search in flight reads a consistent index."""

    entries: list[Entry] = field(default_factory=list)
    # Per document: its sha256 and time as stored, to tell what changed.
    documents: dict[str, tuple[str, str]] = field(default_factory=dict)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # BM25's length normalisation of each chunk (from `lengths`), made once per index, not per query.
    norms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # Postings sorted by term: term t's are [offsets[t], offsets[t+1]).
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    post_chunks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    post_tf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    # Rows normalized; None: the base has no embeddings (or not for every chunk).
    vectors: np.ndarray | None = None
    embedding_model: str | None = None

    @property
    def size(self) -> int:
        return len(self.entries)

    def nbytes(self) -> int:
        arrays = [self.lengths, self.norms, self.offsets, self.post_chunks, self.post_tf]
        if self.vectors is not None:
            arrays.append(self.vectors)
        return sum(a.nbytes for a in arrays)

    # -- building ---------------------------------------------------------------------------

    def replaced(
        self,
        vocabulary: Vocabulary,
        removed: set[str],
        added: Sequence[tuple[str, tuple[str, str], Sequence[tuple[int, Chunk, bytes | None]]]],
        embedding_model: str | None,
    ) -> BaseIndex:
        """A new index without the `removed` documents' chunks and with the `added` ones'
        (document id, its stamp, its chunks with their seq and embedding). CPU-bound: run in a
        thread; only the added chunks are tokenized."""
        keep = np.array([e.document not in removed for e in self.entries], dtype=bool)
        old_index = np.full(len(self.entries), -1, dtype=np.int64)
        old_index[keep] = np.arange(int(keep.sum()))
        entries = [e for e, kept in zip(self.entries, keep) if kept]
        terms_per_term = np.diff(self.offsets)
        post_terms = np.repeat(np.arange(len(terms_per_term), dtype=np.int32), terms_per_term)
        mask = keep[self.post_chunks] if len(self.post_chunks) else np.zeros(0, dtype=bool)
        parts_terms = [post_terms[mask]]
        parts_chunks = [old_index[self.post_chunks[mask]].astype(np.int32)]
        parts_tf = [self.post_tf[mask]]
        lengths = [self.lengths[keep]]
        vectors = [self.vectors[keep]] if self.vectors is not None else []
        documents = {doc: stamp for doc, stamp in self.documents.items() if doc not in removed}
        all_embedded = self.vectors is not None or not self.entries
        held_since = time.perf_counter()
        for document, stamp, chunks in added:
            documents[document] = stamp
            for seq, chunk, embedding in chunks:
                if time.perf_counter() - held_since > _YIELD_S:
                    time.sleep(0)
                    held_since = time.perf_counter()
                ids = vocabulary.add(tokenize(chunk.indexed))
                unique, counts = np.unique(ids, return_counts=True)
                parts_terms.append(unique.astype(np.int32))
                parts_chunks.append(np.full(len(unique), len(entries), dtype=np.int32))
                parts_tf.append(np.minimum(counts, 65535).astype(np.uint16))
                lengths.append(np.array([len(ids)], dtype=np.float32))
                entries.append(Entry(document, seq, chunk))
                if embedding is None:
                    all_embedded = False
                else:
                    vectors.append(np.frombuffer(embedding, dtype="<f4")[None, :])
        terms = np.concatenate(parts_terms)
        order = np.argsort(terms, kind="stable")
        vocab_size = len(vocabulary)
        offsets = np.zeros(vocab_size + 1, dtype=np.int64)
        np.cumsum(np.bincount(terms, minlength=vocab_size), out=offsets[1:])
        matrix = None
        if all_embedded and entries and vectors:
            try:
                matrix = np.vstack(vectors).astype(np.float32)
                norms = np.linalg.norm(matrix, axis=1, keepdims=True)
                matrix /= np.where(norms == 0, 1, norms)
            except ValueError:  # embeddings of different sizes: the model changed midway
                matrix = None
        all_lengths = np.concatenate(lengths).astype(np.float32)
        return BaseIndex(
            entries=entries,
            documents=documents,
            lengths=all_lengths,
            norms=(K1 * (1 - B + B * all_lengths / max(float(all_lengths.mean()), 1.0))).astype(np.float32)
            if len(all_lengths) else np.zeros(0, np.float32),
            offsets=offsets,
            post_chunks=np.concatenate(parts_chunks)[order],
            post_tf=np.concatenate(parts_tf)[order],
            vectors=matrix,
            embedding_model=embedding_model,
        )

    # -- searching --------------------------------------------------------------------------

    def lexical(self, vocabulary: Vocabulary, query: Sequence[str], limit: int) -> list[tuple[int, float]]:
        """The best chunks for the query terms by BM25, as (index, score 0..1), best first."""
        n = self.size
        if not n or not query:
            return []
        ids, unknown = vocabulary.known(query)
        ids = ids[ids < len(self.offsets) - 1]
        unique, weights = np.unique(ids, return_counts=True)
        df = self.offsets[unique + 1] - self.offsets[unique]
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        # The best a chunk could score: every query term, saturated; an unknown term counts at
        # the idf of a term no chunk has.
        best = float((idf * weights).sum() + unknown * math.log1p((n + 0.5) / 0.5)) * (K1 + 1)
        if best <= 0:
            return []
        scores = np.zeros(n, dtype=np.float32)
        for term, term_idf, weight in zip(unique, idf, weights):
            start, end = self.offsets[term], self.offsets[term + 1]
            if start == end:
                continue
            chunks = self.post_chunks[start:end]
            tf = self.post_tf[start:end].astype(np.float32)
            scores[chunks] += (term_idf * weight) * tf * (K1 + 1) / (tf + self.norms[chunks])
        return _top(scores / best, limit)

    def dense(self, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        if self.vectors is None or not self.size or vector.shape[0] != self.vectors.shape[1]:
            return []
        query = vector.astype(np.float32) / (float(np.linalg.norm(vector)) or 1.0)
        return _top(np.maximum(self.vectors @ query, 0), limit)


def _top(scores: np.ndarray, limit: int) -> list[tuple[int, float]]:
    candidates = np.flatnonzero(scores > 0)
    if len(candidates) > limit:
        candidates = candidates[np.argpartition(-scores[candidates], limit - 1)[:limit]]
    ranked = candidates[np.argsort(-scores[candidates], kind="stable")]
    return [(int(i), float(scores[i])) for i in ranked]


# Reciprocal rank fusion's constant (the paper's, and everyone's since).
RRF_K = 60


def fuse(rankings: Sequence[list[tuple[int, float]]], limit: int) -> list[tuple[int, float]]:
    """Rankings merged by reciprocal rank fusion; each chunk keeps its best score."""
    fused: dict[int, float] = {}
    best: dict[int, float] = {}
    for ranking in rankings:
        for rank, (index, score) in enumerate(ranking):
            fused[index] = fused.get(index, 0.0) + 1.0 / (RRF_K + rank + 1)
            best[index] = max(best.get(index, 0.0), score)
    order = sorted(fused, key=lambda i: -fused[i])[:limit]
    return [(i, best[i]) for i in order]
