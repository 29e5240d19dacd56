"""The per-process copy of each task's history window (a plain module, tested directly)."""

from __future__ import annotations

from llm_proxy.context import StoredRound
from llm_proxy.history_cache import HistoryCache


def _round(seq: int) -> StoredRound:
    return StoredRound(seq, 10, [{"role": "user", "content": f"u{seq}"}, {"role": "assistant", "content": f"a{seq}"}])


def test_an_entry_serves_only_the_round_right_after_it_at_the_same_version() -> None:
    cache = HistoryCache(max_tasks=10, max_rounds=50)
    cache.put("t", version=3, before_seq=5, rounds=[_round(4), _round(3)])
    assert cache.known("t") == (3, 4)
    assert [r.seq for r in cache.get("t", 3, 5) or []] == [4, 3]
    assert cache.get("t", 4, 5) is None  # another process changed the task
    assert cache.get("t", 3, 6) is None  # a round it never saw came in between


def test_own_rounds_advance_the_entry_and_anything_else_drops_it() -> None:
    cache = HistoryCache(max_tasks=10, max_rounds=2)
    cache.put("t", version=1, before_seq=2, rounds=[_round(1)])
    cache.advance("t", version=2, stored=_round(2))
    cache.advance("t", version=3, stored=_round(3))
    assert [r.seq for r in cache.get("t", 3, 4) or []] == [3, 2]  # kept to max_rounds
    cache.advance("t", version=5, stored=_round(4))  # version 4 happened elsewhere
    assert cache.known("t") is None


def test_least_recently_used_tasks_are_evicted_and_zero_disables() -> None:
    cache = HistoryCache(max_tasks=2, max_rounds=50)
    for task in ("a", "b"):
        cache.put(task, version=1, before_seq=2, rounds=[_round(1)])
    assert cache.get("a", 1, 2) is not None
    cache.put("c", version=1, before_seq=2, rounds=[_round(1)])
    assert cache.known("b") is None and cache.known("a") == (1, 1) and cache.known("c") == (1, 1)
    off = HistoryCache(max_tasks=0, max_rounds=50)
    off.put("a", version=1, before_seq=2, rounds=[_round(1)])
    assert off.known("a") is None
