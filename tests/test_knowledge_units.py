"""The knowledge room's plain functions, called directly: chunking, terms, the index, what a
round searches with, extraction; random input through hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knowledge.chunking import LIMIT, PAIR_LIMIT, chunk_document
from knowledge.extract import extract
from knowledge.for_rounds import FOLLOW_UP_TERMS, is_small_talk, query_terms, section
from knowledge.index import BaseIndex, Vocabulary, fuse, tokenize
from knowledge.retrieval import Passage


def _index(texts: list[str]) -> tuple[BaseIndex, Vocabulary]:
    vocabulary = Vocabulary()
    chunks = [chunk for text in texts for chunk in chunk_document(text)]
    added = [("doc", ("sha", "t"), [(seq, chunk, None) for seq, chunk in enumerate(chunks)])]
    return BaseIndex().replaced(vocabulary, set(), added, None), vocabulary


def test_chunks_follow_headings_sentences_and_pairs() -> None:
    long_zh = "。".join(f"第{i}句话讲的是产品的第{i}个功能特点和使用方法" for i in range(60)) + "。"
    text = f"# 手册\n\n## 功能\n\n{long_zh}\n\n## 常见问题\n\n问：怎么退款？\n答：七天内在订单页申请。\n\n问：运费谁付？\n答：我们付。\n"
    chunks = chunk_document(text)
    body = [c for c in chunks if c.heading == "手册 > 功能"]
    assert len(body) > 2 and all(len(c.text) <= LIMIT for c in body)
    # Cut between sentences: every piece ends at a full stop, and the next repeats a short last
    # sentence of the one before (the overlap).
    assert all(c.text.endswith("。") for c in body)
    assert body[1].text.split("。")[0] == body[0].text.split("。")[-2]
    pairs = [c.text for c in chunks if c.heading == "手册 > 常见问题"]
    assert pairs == ["问：怎么退款？\n答：七天内在订单页申请。", "问：运费谁付？\n答：我们付。"]
    # The same text gives the same ids; other text other ids.
    assert [c.id for c in chunk_document(text)] == [c.id for c in chunks]
    assert len({c.id for c in chunks}) == len(chunks)


def test_a_hash_in_a_code_block_is_no_heading_and_a_title_heads_a_headless_document() -> None:
    chunks = chunk_document("Intro text.\n\n```\n# not a heading\nx = 1\n```\n", "Guide")
    assert {c.heading for c in chunks} == {"Guide"}
    assert any("# not a heading" in c.text for c in chunks)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("ab 。.\n#问答:Q文字") + ["Q: ", "A: ", "## ", "\n\n", "x" * 700]), max_size=600).map("".join))
def test_any_text_gives_bounded_chunks_with_stable_ids(text: str) -> None:
    chunks = chunk_document(text)
    assert all(0 < len(c.text) <= PAIR_LIMIT for c in chunks)
    assert [c.id for c in chunk_document(text)] == [c.id for c in chunks]


def test_terms_pair_chinese_characters_and_strip_english_endings() -> None:
    assert tokenize("退款政策") == ["退款", "款政", "政策", "退", "款", "政", "策"]
    assert tokenize("退款政策", unigrams=False) == ["退款", "款政", "政策"]
    # Words of asking are cut out before pairing; stop words and endings go.
    assert "什么" not in tokenize("有什么要求") and "么要" not in tokenize("有什么要求")
    assert tokenize("How are refunds charged?") == ["refund", "charg"] == tokenize("refund charge")
    assert tokenize("apples shipping boxes") == tokenize("apple ship box")
    assert tokenize("Ｗｉ－Ｆｉ") == ["wi", "fi"]  # full-width forms, as an IME types them


def test_bm25_ranks_the_matching_chunk_first_and_scores_within_0_and_1() -> None:
    index, vocabulary = _index(["# 保修\n\n两年免费保修。", "# 价格\n\n标准版 399 元。", "# 配送\n\n两天发货。"])
    hits = index.lexical(vocabulary, tokenize("保修多久"), 5)
    assert index.entries[hits[0][0]].chunk.heading == "保修"
    assert all(0 < score <= 1 for _i, score in hits)
    assert index.lexical(vocabulary, tokenize("完全无关的词"), 5) == []
    assert index.lexical(vocabulary, [], 5) == []


def test_a_change_replaces_only_the_changed_document() -> None:
    vocabulary = Vocabulary()
    first = [("a", ("1", "t"), [(0, chunk_document("apples are red")[0], None)]),
             ("b", ("1", "t"), [(0, chunk_document("bananas are yellow")[0], None)])]
    index = BaseIndex().replaced(vocabulary, set(), first, None)
    changed = index.replaced(vocabulary, {"a"}, [("a", ("2", "t"), [(0, chunk_document("apricots are orange")[0], None)])], None)
    assert changed.size == 2 and changed.documents == {"a": ("2", "t"), "b": ("1", "t")}
    assert changed.lexical(vocabulary, tokenize("apple"), 5) == []
    assert changed.entries[changed.lexical(vocabulary, tokenize("apricot"), 5)[0][0]].document == "a"
    assert changed.entries[changed.lexical(vocabulary, tokenize("banana"), 5)[0][0]].document == "b"
    assert index.lexical(vocabulary, tokenize("apple"), 5)  # the old index is untouched
    assert changed.replaced(vocabulary, {"a", "b"}, [], None).size == 0


def test_dense_search_and_fusion() -> None:
    vocabulary = Vocabulary()
    chunks = chunk_document("one\n\n# Two\n\ntwo")
    vectors = [np.array([1, 0], dtype="<f4").tobytes(), np.array([0, 1], dtype="<f4").tobytes()]
    index = BaseIndex().replaced(vocabulary, set(), [("d", ("", ""), [(i, c, vectors[i]) for i, c in enumerate(chunks)])], "m")
    assert [i for i, _ in index.dense(np.array([0.1, 0.9], dtype=np.float32), 5)] == [1, 0]
    assert index.dense(np.array([1, 0, 0], dtype=np.float32), 5) == []  # another model's size
    fused = fuse([[(0, 0.9), (1, 0.2)], [(1, 0.8)]], 5)
    assert fused[0][0] == 1 and dict(fused)[1] == 0.8


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=300))
def test_any_query_searches_without_error(query: str) -> None:
    index, vocabulary = _index(["# A\n\nsome text 文字", "# B\n\nother 内容"])
    for _i, score in index.lexical(vocabulary, tokenize(query), 3):
        assert 0 < score <= 1


def test_what_a_round_searches_with() -> None:
    assert is_small_talk("好的！") and is_small_talk("Thanks.") and is_small_talk("ok ok") and is_small_talk("  ")
    assert not is_small_talk("好的，价格是多少") and not is_small_talk("thanks, and the refund?")
    # A short follow-up takes the turn before it along, its own words twice.
    terms = query_terms("那价格呢", "星辰音箱的保修政策是什么")
    assert terms.count("价格") == 2 and "保修" in terms
    long_turn = "请详细介绍一下星辰音箱专业版和标准版在音质续航和连接方式上的全部区别"
    assert len(tokenize(long_turn)) > FOLLOW_UP_TERMS and query_terms(long_turn, "保修") == tokenize(long_turn)


def test_the_section_keeps_within_max_chars() -> None:
    passages = [Passage("b", "d", f"c{i}", "H", "字" * 300, 0.5) for i in range(5)]
    text = section(passages, 700)
    assert text.count("[") == 2 and len(text) <= 700 + 10
    assert section(passages[:1], 200).startswith("[1] H\n") and len(section(passages[:1], 200)) == 200


def test_extraction_keeps_text_and_drops_what_cannot_be_stored() -> None:
    assert extract("第一段\x00\r\n\r\n\r\n\r\n第二段".encode(), "text/plain").text == "第一段\n\n第二段"
    assert extract("退款".encode("gb18030"), "text/plain").text == "退款"
    page = extract(b"<h2>Title</h2><ul><li>one</li><li>two</li></ul><nav>menu</nav>", "text/html").text
    assert "## Title" in page and "- one" in page and "menu" not in page


def test_a_large_base_is_searched_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import threading

    from knowledge import retrieval

    knowledge = retrieval.Knowledge(db=None)  # type: ignore[arg-type]  # search reads no database
    index, vocabulary = _index(["# 保修\n\n两年免费保修。", "# 价格\n\n399 元。"])
    knowledge.vocabulary = vocabulary
    knowledge._indexes["b"] = index
    threads: list[str] = []
    ranked = knowledge._ranked
    monkeypatch.setattr(knowledge, "_ranked", lambda *args: threads.append(threading.current_thread().name) or ranked(*args))

    async def search() -> list[Passage]:
        return await knowledge.search(["b", "missing"], "保修", 3)

    assert asyncio.run(search())[0].heading == "保修" and threads == ["MainThread"]
    monkeypatch.setattr(retrieval, "_THREAD_FROM_CHUNKS", 2)
    assert asyncio.run(search())[0].heading == "保修" and threads[-1] != "MainThread"
