"""`llm_proxy.memory_context`: which rounds a context with a summary carries, when a batch is
folded, and whose memory a request reads. Plain functions, called directly; hypothesis for the
invariant that nothing falls between the summary and the window while the summarizer keeps up."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.context import StoredRound, window
from llm_proxy.memory_context import FOLD_EVERY, MemoryView, UserKey, fold_every, user_key, with_summary
from llm_proxy.profiles import MemoryConfig


def _rounds(last_seq: int, readable: int = 50) -> list[StoredRound]:
    """Finished rounds 1..last_seq as a claim reads them: newest first, at most `readable`."""
    return [StoredRound(seq, 10, []) for seq in range(last_seq, max(0, last_seq - readable), -1)]


def test_rounds_not_folded_yet_stay_until_a_batch_is_folded() -> None:
    loaded = _rounds(20)
    shown = window(loaded, 4, 10_000)  # rounds 17-20
    rounds, fold_to = with_summary(loaded, shown, MemoryView(through_seq=13), 21, 4)
    assert [r.seq for r in rounds] == [14, 15, 16, 17, 18, 19, 20] and fold_to is None
    rounds, fold_to = with_summary(loaded, shown, MemoryView(through_seq=12), 21, 4)
    assert [r.seq for r in rounds] == list(range(13, 21)) and fold_to == 16
    # A summarizer that lags: the context keeps only the newest batch before the window.
    rounds, fold_to = with_summary(loaded, shown, MemoryView(through_seq=2), 21, 4)
    assert [r.seq for r in rounds] == list(range(13, 21)) and fold_to == 16
    # A summary being redone (905) is folded again whatever its coverage; nothing to fold yet is nothing.
    assert with_summary(loaded, shown, MemoryView(through_seq=16, stale=True), 21, 4)[1] == 16
    assert with_summary(_rounds(0), [], MemoryView(stale=True), 1, 4)[1] is None


def test_a_batch_is_at_most_the_window_and_the_rounds_read_beyond_it() -> None:
    assert fold_every(4, 50) == 4
    assert fold_every(30, 50) == FOLD_EVERY
    assert fold_every(45, 50) == 5
    assert fold_every(50, 50) == 1  # nothing is read beyond the window: every round is folded
    assert fold_every(0, 50) == 1


@given(st.integers(1, 10), st.integers(1, 200))
def test_nothing_falls_between_the_summary_and_the_window_while_folds_keep_up(window_rounds: int, rounds_so_far: int) -> None:
    """Each round folds what it asks for before the next (a summarizer that keeps up): every
    context holds the summary's rounds' successors without a gap, and at most a batch more than
    the window."""
    every = fold_every(window_rounds, 50)
    through = 0
    for seq in range(1, rounds_so_far + 1):
        loaded = _rounds(seq - 1)
        shown = window(loaded, window_rounds, 10_000)
        rounds, fold_to = with_summary(loaded, shown, MemoryView(through_seq=through), seq, every)
        if rounds:
            assert rounds[0].seq == through + 1 and [r.seq for r in rounds] == list(range(through + 1, seq))
        assert len(rounds) <= window_rounds + every
        if fold_to is not None:
            through = fold_to


def test_the_user_is_where_the_profile_says_and_only_a_usable_id_counts() -> None:
    meta = {"user_id": "u-1", "member": 42, "nested": {"id": 1}, "flag": True, "empty": "", "long": "x" * 300}
    on = MemoryConfig(per_user=True)
    assert user_key(on, "companion", "app", "bot", meta) == UserKey("app", "companion", "u-1")  # meta.user_id by default
    assert user_key(MemoryConfig(per_user=True, user_id="header.X-User-Id"), "p", "app", "bot", meta) == UserKey("app", "p", "bot")
    assert user_key(MemoryConfig(per_user=True, user_id="meta.member"), "p", None, None, meta) == UserKey("", "p", "42")
    for key in ("nested", "flag", "empty", "long", "absent"):
        assert user_key(MemoryConfig(per_user=True, user_id=f"meta.{key}"), "p", "app", "bot", meta) is None
    assert user_key(MemoryConfig(per_user=False), "p", "app", "bot", meta) is None
