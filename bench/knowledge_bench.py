"""Knowledge bases: retrieval quality, memory and search time per size, and what `knowledge.mode:
auto` adds to a round's time to first token, side by side with the same profile without knowledge.

1. Quality: the evaluation set (bench/knowledge_eval/questions.yaml: Chinese questions over the
   TRTC documents split at their top-level headings, English ones over an FAQ), recall@1/3/5 and
   MRR for lexical search (bigrams and single characters; bigrams alone), dense search with the
   deterministic test embedder (the fake upstream's hashed bag of terms: no model here) and the
   two fused.
2. Size: a base of N chunks (sentences of the TRTC documents, shuffled into 300-character
   chunks) indexed in this process: build time, memory (Python objects and arrays, by
   tracemalloc), search time p50/p99.
3. Rounds: one `serve --only llm` process (SQLite) with a base of `--chunks` chunks, rounds sent
   alternately to a profile with `knowledge: {mode: auto}` and the same profile without, TTFT of
   each; then 50 conversations at once, with and without a 2 MB document being ingested.

    .venv/bin/python bench/knowledge_bench.py            # make bench-knowledge
    .venv/bin/python bench/knowledge_bench.py --quick    # short smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from knowledge import store  # noqa: E402
from knowledge.chunking import Chunk, chunk_document  # noqa: E402
from knowledge.for_rounds import query_terms  # noqa: E402
from knowledge.index import BaseIndex, Vocabulary, fuse, tokenize  # noqa: E402
from llm_bench import FastUpstream  # noqa: E402
from llm_proxy.fake_upstream import fake_embedding  # noqa: E402
from loadgen import Client  # noqa: E402
from report import table, write_section  # noqa: E402
from tests.support import API_KEY, Proxy, run_db  # noqa: E402

EVAL = ROOT / "bench" / "knowledge_eval"
ADMIN_KEY = "bench-admin"
CHAT = "/v1/chat/completions"
# Each conversation's pace while a document is ingested: a round a second (a voice conversation
# has one every few seconds), 50 rounds/s for 50 conversations.
INTERVAL_S = 1.0


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _ms(x: float) -> str:
    return f"{x * 1000:.2f}"


# -- 1. quality ---------------------------------------------------------------------------------


def _documents(name: str) -> list[tuple[str, str]]:
    """(id, text) of the set's documents: the Chinese file split at its top-level headings
    (outside code blocks), the FAQ whole."""
    text = (EVAL / name).read_text(encoding="utf-8")
    parts: list[list[str]] = [[]]
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("# ") and parts[-1]:
            parts.append([])
        parts[-1].append(line)
    return [(f"doc{i}", "\n".join(lines)) for i, lines in enumerate(parts) if "".join(lines).strip()]


def _index(documents: list[tuple[str, str]], unigrams: bool, dense: bool) -> tuple[BaseIndex, Vocabulary]:
    import knowledge.index as index_module

    vocabulary = Vocabulary()
    added = []
    for doc_id, text in documents:
        chunks = chunk_document(text)
        vectors = [np.asarray(fake_embedding(c.indexed), dtype="<f4").tobytes() for c in chunks] if dense else [None] * len(chunks)
        added.append((doc_id, ("", ""), [(seq, chunk, vectors[seq]) for seq, chunk in enumerate(chunks)]))
    original = index_module.tokenize
    index_module.tokenize = lambda text, unigrams=unigrams: original(text, unigrams=unigrams)  # type: ignore[assignment]
    try:
        return BaseIndex().replaced(vocabulary, set(), added, "fake" if dense else None), vocabulary
    finally:
        index_module.tokenize = original  # type: ignore[assignment]


def _rank(index: BaseIndex, vocabulary: Vocabulary, question: dict[str, Any], mode: str, unigrams: bool) -> int | None:
    """The 1-based rank of the first chunk holding the answer among the top 5, or None."""
    turn, previous = question["q"], question.get("previous")
    terms = [t for t in query_terms(turn, previous)] if unigrams else (
        tokenize(turn, unigrams=False) * 2 + tokenize(previous, unigrams=False) if previous else tokenize(turn, unigrams=False))
    text = f"{turn}\n{previous}" if previous else turn
    lexical = index.lexical(vocabulary, terms, 20)
    dense = index.dense(np.asarray(fake_embedding(text), dtype=np.float32), 20) if mode != "lexical" else []
    ranked = {"lexical": lexical, "dense": dense, "fused": fuse([lexical, dense], 20)}[mode]
    for rank, (position, _score) in enumerate(ranked[:5], 1):
        chunk = index.entries[position].chunk
        if question["answer"] in chunk.text or question["answer"] in chunk.heading:
            return rank
    return None


def quality() -> tuple[list[list[str]], dict[str, float]]:
    sets = yaml.safe_load((EVAL / "questions.yaml").read_text(encoding="utf-8"))
    rows = []
    recall3: dict[str, float] = {}
    for language, spec in sets.items():
        documents = _documents(spec["documents"])
        for label, mode, unigrams in (("lexical (bigrams + characters)", "lexical", True),
                                      ("lexical (bigrams only)", "lexical", False),
                                      ("dense (test embedder)", "dense", True),
                                      ("fused (RRF)", "fused", True)):
            index, vocabulary = _index(documents, unigrams, dense=mode != "lexical")
            ranks = [_rank(index, vocabulary, q, mode, unigrams) for q in spec["questions"]]
            n = len(ranks)
            at = lambda k: sum(1 for r in ranks if r is not None and r <= k) / n  # noqa: E731
            mrr = sum(1 / r for r in ranks if r is not None) / n
            missed = [q["q"] for q, r in zip(spec["questions"], ranks) if r is None or r > 3]
            rows.append([language, label, str(n), str(index.size), f"{at(1):.2f}", f"{at(3):.2f}", f"{at(5):.2f}",
                         f"{mrr:.2f}", "; ".join(missed[:3]) or "-"])
            recall3[f"{language}/{label}"] = at(3)
    return rows, recall3


# -- 2. size ------------------------------------------------------------------------------------


def _synthetic_chunks(n: int, seed: int = 7) -> list[Chunk]:
    """`n` chunks of about 300 characters from the TRTC documents' sentences, shuffled."""
    text = (EVAL / "trtc_ai_conversation_zh.md").read_text(encoding="utf-8")
    sentences = [s.strip() for s in re.split(r"(?<=[。！？；])|\n", text) if len(s.strip()) > 8]
    rng = random.Random(seed)
    chunks = []
    for i in range(n):
        body = ""
        while len(body) < 300:
            body += rng.choice(sentences)
        chunks.append(Chunk(hashlib.sha1(f"{i}".encode()).hexdigest()[:16], f"Doc {i // 500} > Section {i % 37}", body[:400]))
    return chunks


def size_row(n: int, queries: list[str]) -> list[str]:
    chunks = _synthetic_chunks(n)
    per_doc = 500
    added = [(f"d{d}", ("", ""), [(s, chunk, None) for s, chunk in enumerate(chunks[d * per_doc:(d + 1) * per_doc])])
             for d in range((n + per_doc - 1) // per_doc)]
    gc.collect()
    # Timed without tracing (tracemalloc slows Python's allocations), then built again to measure.
    started = time.perf_counter()
    BaseIndex().replaced(Vocabulary(), set(), added, None)
    build = time.perf_counter() - started
    gc.collect()
    tracemalloc.start()
    vocabulary = Vocabulary()
    index = BaseIndex().replaced(vocabulary, set(), added, None)
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The chunks' own text was made before tracing began; a server holds it too.
    text_bytes = sum(sys.getsizeof(c.text) + sys.getsizeof(c.heading) + sys.getsizeof(c.id) for c in chunks)
    times = []
    for query in queries * max(1, 400 // len(queries)):
        t0 = time.perf_counter()
        index.lexical(vocabulary, tokenize(query), 12)
        times.append(time.perf_counter() - t0)
    # One more document into the full base: what a change costs (only it is tokenized).
    extra = [("new", ("", ""), [(s, c, None) for s, c in enumerate(_synthetic_chunks(100, seed=9))])]
    t0 = time.perf_counter()
    index.replaced(vocabulary, set(), extra, None)
    change = time.perf_counter() - t0
    return [f"{n:,}", f"{build:.2f}", f"{change * 1000:.0f}", f"{index.nbytes() / 1e6:.1f}",
            f"{(current + text_bytes) / 1e6:.1f}", _ms(statistics.median(times)), _ms(_p(times, 0.99))]


# -- 3. rounds ----------------------------------------------------------------------------------


def _document_of(size: int) -> bytes:
    """A Markdown document of about `size` bytes: sections of the synthetic chunks' text."""
    parts: list[bytes] = []
    total = 0
    for i, chunk in enumerate(_synthetic_chunks(size // 300 + 10, seed=11)):
        part = f"## Part {i}\n\n{chunk.text}\n\n".encode()
        parts.append(part)
        total += len(part)
        if total >= size:
            break
    return b"".join(parts)


def _profiles(upstream_url: str) -> str:
    return f"""
profiles:
  - name: plain
    models: [plain]
    default: true
    tools: []
    upstream: {{base_url: "{upstream_url}"}}
  - name: kb
    models: [kb]
    tools: []
    upstream: {{base_url: "{upstream_url}"}}
    knowledge: {{bases: [bench], top_k: 3, mode: auto}}
"""


def _seed_base(url: str, n: int) -> None:
    chunks = _synthetic_chunks(n)
    per_doc = 500
    for d in range(0, n, per_doc):
        part = chunks[d:d + per_doc]
        doc = store.NewDocument(base="bench", id=f"d{d // per_doc}", title=None, content_type="text/markdown",
                                bytes=sum(len(c.text.encode()) for c in part), chars=sum(len(c.text) for c in part),
                                sha256=hashlib.sha256(str(d).encode()).hexdigest(), chunks=part)
        run_db(url, store.put_document, doc)


async def _rounds(url: str, pairs: int, concurrency: int, questions: list[str]) -> dict[str, list[float]]:
    """`pairs` rounds to each profile, alternating, `concurrency` at once."""
    client = Client(url)
    ttft: dict[str, list[float]] = {"plain": [], "kb": []}
    errors = 0
    jobs = [(model, n) for n in range(pairs) for model in ("plain", "kb")]
    random.Random(3).shuffle(jobs)

    async def worker(worker_id: int) -> None:
        nonlocal errors
        while jobs:
            model, n = jobs.pop()
            body = {"model": model, "stream": True,
                    "messages": [{"role": "user", "content": questions[n % len(questions)]}]}
            headers = {"authorization": f"Bearer {API_KEY}", "x-task-id": f"kb-{model}-{worker_id}-{n // 20}",
                       "x-request-id": uuid.uuid4().hex}
            started = time.perf_counter()
            outcome = await client.post(CHAT, body, headers)
            if outcome.status != 200 or outcome.first is None:
                errors += 1
                continue
            ttft[model].append(outcome.first - started)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    client.close()
    if errors:
        raise SystemExit(f"{errors} rounds failed")
    return ttft


async def _with_ingestion(url: str, conversations: int, rounds_each: int, questions: list[str], document: bytes | None) -> tuple[list[float], float]:
    """`conversations` conversations, each sending a round every `INTERVAL_S` (starts spread over
    the first interval); meanwhile (if given) a document is PUT."""
    client = Client(url)
    ttft: list[float] = []

    async def conversation(c: int) -> None:
        await asyncio.sleep(INTERVAL_S * c / conversations)
        for n in range(rounds_each):
            tick = time.perf_counter()
            body = {"model": "kb", "stream": True, "messages": [{"role": "user", "content": questions[(c + n) % len(questions)]}]}
            headers = {"authorization": f"Bearer {API_KEY}", "x-task-id": f"ingest-{c}-{uuid.uuid4().hex[:6]}",
                       "x-request-id": uuid.uuid4().hex}
            started = time.perf_counter()
            outcome = await client.post(CHAT, body, headers)
            if outcome.status == 200 and outcome.first is not None:
                ttft.append(outcome.first - started)
            await asyncio.sleep(max(0.0, INTERVAL_S - (time.perf_counter() - tick)))

    async def ingest() -> float:
        if document is None:
            return 0.0
        await asyncio.sleep(INTERVAL_S)
        started = time.perf_counter()
        async with httpx.AsyncClient(timeout=300) as http:
            response = await http.put(f"{url}/admin/v1/knowledge/bench/documents/big", content=document,
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "text/markdown"})
        if response.status_code not in (200, 201):
            raise SystemExit(f"ingestion failed: {response.status_code} {response.text[:200]}")
        return time.perf_counter() - started

    results = await asyncio.gather(ingest(), *(conversation(c) for c in range(conversations)))
    client.close()
    return ttft, results[0]


def rounds(args: argparse.Namespace, workdir: Path) -> tuple[list[list[str]], list[list[str]], dict[str, float]]:
    fake = FastUpstream(workdir / "upstream.log")
    fake.start()
    config = workdir / "profiles.yaml"
    config.write_text(_profiles(fake.url + "/v1"))
    proxy = Proxy(workdir / "proxy", {"API_KEYS": API_KEY, "ADMIN_API_KEYS": ADMIN_KEY, "LOG_LEVEL": "WARNING",
                                      "CONFIG_FILE": str(config), "KNOWLEDGE_MAX_DOCUMENT_MB": "4"})
    from migrations import upgrade

    upgrade(proxy.database_url)
    _seed_base(proxy.database_url, args.chunks)
    questions = [q["q"] for q in yaml.safe_load((EVAL / "questions.yaml").read_text(encoding="utf-8"))["zh"]["questions"]]
    try:
        proxy.start("--only", "llm")
        ready = time.monotonic() + 60
        while time.monotonic() < ready:  # the base is read by the first poll after the start
            hits = httpx.post(f"{proxy.url}/admin/v1/knowledge/bench/search", json={"query": "打断"},
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            if hits.status_code == 200 and hits.json()["results"]:
                break
            time.sleep(0.2)
        asyncio.run(_rounds(proxy.url, 20, args.concurrency, questions))  # warm-up
        ttft = asyncio.run(_rounds(proxy.url, args.pairs, args.concurrency, questions))
        big = _document_of(args.ingest_kb * 1024)
        quiet, _ = asyncio.run(_with_ingestion(proxy.url, args.conversations, args.rounds_each, questions, None))
        busy, took = asyncio.run(_with_ingestion(proxy.url, args.conversations, args.rounds_each, questions, big))
    finally:
        proxy.stop()
        fake.stop()
    plain, kb = ttft["plain"], ttft["kb"]
    side = [
        ["same profile without knowledge", str(len(plain)), _ms(statistics.median(plain)), _ms(_p(plain, 0.99)), "-", "-"],
        [f"knowledge: auto, {args.chunks:,} chunks, top_k 3", str(len(kb)), _ms(statistics.median(kb)), _ms(_p(kb, 0.99)),
         _ms(statistics.median(kb) - statistics.median(plain)), _ms(_p(kb, 0.99) - _p(plain, 0.99))],
    ]
    ingest = [
        [f"{args.conversations} conversations", str(len(quiet)), _ms(statistics.median(quiet)), _ms(_p(quiet, 0.99)), "-"],
        [f"the same, while a {len(big) / 1e6:.1f} MB document is ingested", str(len(busy)), _ms(statistics.median(busy)),
         _ms(_p(busy, 0.99)), f"{took:.1f} s"],
    ]
    added = {"median": statistics.median(kb) - statistics.median(plain), "p99": _p(kb, 0.99) - _p(plain, 0.99)}
    return side, ingest, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks in the base the rounds search")
    parser.add_argument("--sizes", default="10000,100000", help="base sizes for the memory rows")
    parser.add_argument("--pairs", type=int, default=500, help="rounds to each profile")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--rounds-each", type=int, default=8)
    parser.add_argument("--ingest-kb", type=int, default=2048, help="size of the document ingested meanwhile")
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.quick:
        args.chunks, args.sizes, args.pairs, args.conversations, args.rounds_each, args.ingest_kb = 1000, "1000", 20, 5, 2, 64
    quality_rows, recall3 = quality()
    queries = [q["q"] for q in yaml.safe_load((EVAL / "questions.yaml").read_text(encoding="utf-8"))["zh"]["questions"]]
    size_rows = [size_row(int(n), queries) for n in args.sizes.split(",")]
    side, ingest, added = rounds(args, Path(tempfile.mkdtemp(prefix="knowledge-bench-")))
    command = "python bench/knowledge_bench.py " + shlex.join(sys.argv[1:])
    body = (
        "Retrieval quality on the evaluation set (`bench/knowledge_eval/`): recall@k is the share of questions whose "
        "answering chunk is among the first k, MRR the mean of 1/rank (0 past 5).\n\n"
        + table(["set", "search", "questions", "chunks", "recall@1", "recall@3", "recall@5", "MRR", "missed at 3 (first 3)"],
                quality_rows)
        + f"\n\nBase size: the index built in one process ({os.cpu_count()} cores), memory by tracemalloc (chunks' "
        "text included), lexical search times over the Chinese questions; 'a change' is one 100-chunk document added "
        "to the full base.\n\n"
        + table(["chunks", "build (s)", "a change (ms)", "index arrays (MB)", "memory in all (MB)", "search p50 (ms)",
                 "search p99 (ms)"], size_rows)
        + f"\n\nTime to first token through `serve --only llm` (SQLite, fast fake upstream), {args.concurrency} rounds at "
        "once, the two profiles' rounds interleaved in one run; ms.\n\n"
        + table(["profile", "rounds", "median TTFT", "p99 TTFT", "added median", "added p99"], side)
        + f"\n\nLive rounds while a large document is ingested through the admin API (each conversation sends a round "
        f"every {INTERVAL_S:g} s, `knowledge: auto` profile); ms.\n\n"
        + table(["load", "rounds", "median TTFT", "p99 TTFT", "ingestion took"], ingest)
        + f"\n\nCommand: `{command.strip()}`"
    )
    print(body)
    if not args.no_write:
        write_section("knowledge", "### Knowledge bases (issue 29)\n\n" + body)
    zh = recall3.get("zh/lexical (bigrams + characters)", 0.0)
    if zh < 0.9:
        raise SystemExit(f"recall@3 of lexical search on the Chinese set is {zh:.2f}, under 0.9")


if __name__ == "__main__":
    main()
