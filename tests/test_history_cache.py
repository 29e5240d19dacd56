"""The per-process copy of each task's history window (a plain module, tested directly)."""

from __future__ import annotations

from llm_proxy.context import StoredRound
from llm_proxy.history_cache import HistoryCache
from llm_proxy.store import HistoryCopy


def _round(seq: int) -> StoredRound:
    return StoredRound(seq, 10, [{"role": "user", "content": f"u{seq}"}, {"role": "assistant", "content": f"a{seq}"}])


def _seqs(rounds: list[StoredRound] | None) -> list[int] | None:
    return None if rounds is None else [r.seq for r in rounds]


def test_an_entry_serves_only_the_round_right_after_it_at_the_same_version() -> None:
    cache = HistoryCache(max_tasks=10, max_rounds=50)
    cache.put("t", HistoryCopy(version=3, through_seq=4, edits=0), [_round(4), _round(3)])
    assert cache.known("t") == HistoryCopy(3, 4, 0)
    assert _seqs(cache.get("t", 3, 5)) == [4, 3]
    assert cache.get("t", 4, 5) is None  # another process changed the task
    assert cache.get("t", 3, 6) is None  # a round it never saw came in between


def test_own_rounds_advance_the_entry_and_others_rounds_leave_it_as_it_was() -> None:
    cache = HistoryCache(max_tasks=10, max_rounds=2)
    cache.put("t", HistoryCopy(1, 1, 0), [_round(1)])
    cache.advance("t", version=2, stored=_round(2))
    cache.advance("t", version=3, stored=_round(3))
    assert _seqs(cache.get("t", 3, 4)) == [3, 2]  # kept to max_rounds
    cache.advance("t", version=5, stored=_round(5))  # round 4 (version 4) happened elsewhere
    assert cache.known("t") == HistoryCopy(3, 3, 0)
    assert cache.get("t", 5, 6) is None


def test_rounds_added_elsewhere_extend_the_entry_it_was_read_against() -> None:
    cache = HistoryCache(max_tasks=10, max_rounds=3)
    cache.put("t", HistoryCopy(3, 3, 1), [_round(3), _round(2), _round(1)])
    extended = cache.extend("t", 3, [_round(5), _round(4)], HistoryCopy(5, 5, 1))
    assert _seqs(extended) == [5, 4, 3]
    assert cache.known("t") == HistoryCopy(5, 5, 1)
    # Read against another copy (the entry moved on meanwhile), or an edit since: not used.
    assert cache.extend("t", 3, [_round(6)], HistoryCopy(6, 6, 1)) is None
    assert cache.extend("t", 5, [_round(6)], HistoryCopy(7, 6, 2)) is None
    assert cache.known("t") == HistoryCopy(5, 5, 1)
    assert cache.extend("nobody", 0, [_round(1)], HistoryCopy(1, 1, 0)) is None


def test_least_recently_used_tasks_are_evicted_and_zero_disables() -> None:
    cache = HistoryCache(max_tasks=2, max_rounds=50)
    for task in ("a", "b"):
        cache.put(task, HistoryCopy(1, 1, 0), [_round(1)])
    assert cache.get("a", 1, 2) is not None
    cache.put("c", HistoryCopy(1, 1, 0), [_round(1)])
    assert cache.known("b") is None and cache.known("a") == HistoryCopy(1, 1, 0) and cache.known("c") is not None
    off = HistoryCache(max_tasks=0, max_rounds=50)
    off.put("a", HistoryCopy(1, 1, 0), [_round(1)])
    assert off.known("a") is None


def test_a_claim_reads_only_what_its_copy_lacks(tmp_path) -> None:
    from migrations import upgrade
    from llm_proxy import store
    from tests.support import run_db

    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)

    def claim(known: HistoryCopy | None = None, **flags: bool) -> store.Claim:
        task = store.TaskInfo("t", request_id=None)
        return run_db(url, lambda conn: store.claim_round(conn, task, max_rounds=50, known=known, **flags))

    def finish(claimed: store.Claim) -> int:
        said = [{"role": "user", "content": f"u{claimed.seq}"}, {"role": "assistant", "content": f"a{claimed.seq}"}]
        finished = run_db(url, lambda conn: store.finish_round(
            conn, claimed, said, interrupted=False, model="m", finish_reason="stop", usage=None))
        return finished.version

    first = claim()
    version = finish(first)
    copy = HistoryCopy(version, 1, first.edits)
    for _ in range(2):  # rounds 2 and 3, served by another process
        finish(claim())
    fourth = claim(copy)
    assert fourth.history is None and fourth.newer_after == 1
    assert [(r.seq, r.messages[0]["content"]) for r in fourth.newer or []] == [(3, "u3"), (2, "u2")]
    run_db(url, lambda conn: store.release_round(conn, fourth))

    reopened = claim(continue_round=True)  # an edit of a finished round (round 3 taken up again)
    run_db(url, lambda conn: store.release_round(conn, reopened))
    fifth = claim(copy)
    assert fifth.newer is None and [r.seq for r in fifth.history or []] == [3, 2, 1]
    assert fifth.edits == first.edits + 1


def test_a_task_made_again_after_its_deletion_matches_no_old_copy(tmp_path) -> None:
    """Same id, same number of rounds: the new task's random first edit count tells them apart,
    so the claim reads the (empty) history instead of trusting a copy of the deleted one."""
    from admin.lifecycle import delete_tasks
    from migrations import upgrade
    from llm_proxy import store
    from tests.support import run_db

    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(url)
    task = store.TaskInfo("t", request_id=None)
    said = [{"role": "user", "content": "secret"}, {"role": "assistant", "content": "noted"}]
    old = run_db(url, lambda conn: store.claim_round(conn, task, max_rounds=50))
    finished = run_db(url, lambda conn: store.finish_round(
        conn, old, said, interrupted=False, model="m", finish_reason="stop", usage=None))
    copy = HistoryCopy(finished.version, 1, old.edits)
    assert run_db(url, lambda conn: delete_tasks(conn, ["t"])) == ["t"]
    again = run_db(url, lambda conn: store.claim_round(conn, task, max_rounds=50))
    run_db(url, lambda conn: store.finish_round(
        conn, again, said, interrupted=False, model="m", finish_reason="stop", usage=None))
    second = run_db(url, lambda conn: store.claim_round(conn, task, max_rounds=50, known=copy))
    assert second.seq == 2 and second.edits != copy.edits
    assert [r.seq for r in second.history or []] == [1]
