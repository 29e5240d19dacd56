"""`llm_proxy.memory_context`: which rounds a context with a summary carries, when rounds are
folded, and whose memory a request reads. Plain functions, called directly; hypothesis for the
invariant that nothing falls between the summary and the window while the summarizer keeps up."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.context import StoredRound, window
from llm_proxy.memory_context import MAX_BEHIND, MemoryView, UserKey, user_key, with_summary
from llm_proxy.profiles import MemoryConfig


def _rounds(last_seq: int, readable: int = 50) -> list[StoredRound]:
    """Finished rounds 1..last_seq as a claim reads them: newest first, at most `readable`."""
    return [StoredRound(seq, 10, []) for seq in range(last_seq, max(0, last_seq - readable), -1)]


def test_rounds_are_folded_ahead_once_the_window_is_full() -> None:
    loaded = _rounds(20)
    shown = window(loaded, 4, 10_000)  # rounds 17-20
    # The summary reaches two rounds into the window: nothing to do yet.
    assert with_summary(loaded, shown, MemoryView(through_seq=18), 21, 4) == (shown, None)
    # One round into it: every finished round but the newest is folded; the context is the window.
    assert with_summary(loaded, shown, MemoryView(through_seq=17), 21, 4) == (shown, 19)
    # A fold that has not landed yet: the rounds between the summary and the window are carried.
    rounds, fold_to = with_summary(loaded, shown, MemoryView(through_seq=14), 21, 4)
    assert [r.seq for r in rounds] == list(range(15, 21)) and fold_to == 19
    # A summarizer far behind: only the newest MAX_BEHIND of them.
    rounds, _ = with_summary(loaded, shown, MemoryView(through_seq=0), 21, 4)
    assert [r.seq for r in rounds] == list(range(17 - MAX_BEHIND, 21))
    # A window not full yet: no fold; a summary being redone (905): folded again whatever it covers.
    assert with_summary(_rounds(3), window(_rounds(3), 4, 10_000), MemoryView(), 4, 4)[1] is None
    assert with_summary(loaded, shown, MemoryView(through_seq=19, stale=True), 21, 4)[1] == 19
    assert with_summary(_rounds(1), window(_rounds(1), 4, 10_000), MemoryView(stale=True), 2, 4)[1] is None


@given(st.integers(1, 12), st.integers(1, 150))
def test_nothing_falls_between_the_summary_and_the_window_while_folds_keep_up(window_rounds: int, rounds_so_far: int) -> None:
    """Each fold lands before the next round (a summarizer that keeps up): every context holds the
    successors of the summary's rounds without a gap and at most one round more than the window,
    and a fold runs at most every other round once the window is at least 4."""
    through, folds = 0, 0
    for seq in range(1, rounds_so_far + 1):
        loaded = _rounds(seq - 1)
        shown = window(loaded, window_rounds, 10_000)
        rounds, fold_to = with_summary(loaded, shown, MemoryView(through_seq=through), seq, window_rounds)
        assert [r.seq for r in rounds] == list(range(max(1, min(through + 1, shown[0].seq if shown else seq)), seq))
        assert len(rounds) <= window_rounds + 1
        if fold_to is not None:
            assert fold_to > through
            through, folds = fold_to, folds + 1
    if window_rounds >= 4:
        assert folds <= rounds_so_far // 2


def test_the_user_is_where_the_profile_says_and_only_a_usable_id_counts() -> None:
    meta = {"user_id": "u-1", "member": 42, "nested": {"id": 1}, "flag": True, "empty": "", "long": "x" * 300}
    on = MemoryConfig(per_user=True)
    assert user_key(on, "companion", "app", "bot", meta) == UserKey("app", "companion", "u-1")  # meta.user_id by default
    assert user_key(MemoryConfig(per_user=True, user_id="header.X-User-Id"), "p", "app", "bot", meta) == UserKey("app", "p", "bot")
    assert user_key(MemoryConfig(per_user=True, user_id="meta.member"), "p", None, None, meta) == UserKey("", "p", "42")
    for key in ("nested", "flag", "empty", "long", "absent"):
        assert user_key(MemoryConfig(per_user=True, user_id=f"meta.{key}"), "p", "app", "bot", meta) is None
    assert user_key(MemoryConfig(per_user=False), "p", "app", "bot", meta) is None
