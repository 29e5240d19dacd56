"""What a round's context takes from memory (`memory/`, wired by the app): the task's rolling
summary, the user's memory as the task began, and the stored rounds the context must still carry
because no summary covers them yet. The chat proxy knows memory only through `MemoryKeeper`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from llm_proxy.context import StoredRound
from llm_proxy.models import storable_id
from llm_proxy.profiles import MemoryConfig

if TYPE_CHECKING:
    from llm_proxy.agents import Agent

# Rounds the summary does not cover yet, carried before the window while a fold catches up (so
# nothing falls between the summary and the window), at most: a summarizer that lags further
# loses the oldest of them from the context until it catches up, and the prompt stays bounded.
MAX_BEHIND = 10


@dataclass(frozen=True)
class UserKey:
    """An end user: their memory is theirs within one app and one profile."""

    sdk_app_id: str
    profile: str
    user_id: str


@dataclass(frozen=True)
class MemoryView:
    # The last round (seq) the task's summary covers, and its text.
    through_seq: int = 0
    summary: str | None = None
    # A round the summary covers was cut (905): it is being redone.
    stale: bool = False
    # The user's memory as the task began (`memory.per_user`).
    user_memory: str | None = None


class MemoryKeeper(Protocol):
    """What a round needs of memory (`memory.keeper.Keeper`)."""

    async def view(self, task_id: str, edits: int, user: UserKey | None, model: str) -> MemoryView: ...

    def fold_up_to(self, task_id: str, up_to_seq: int, agent: Agent, model: str) -> None: ...


def user_key(config: MemoryConfig, profile: str, sdk_app_id: str | None, header_user: str | None,
             meta: Mapping[str, Any]) -> UserKey | None:
    """The request's end user, where `memory.user_id` says to find them; None (no per-user memory
    for this request) without a usable id: a missing field, an object, an empty or oversized value."""
    if not config.per_user:
        return None
    source = config.user_id or "meta.user_id"
    value = header_user if source == "header.X-User-Id" else meta.get(source.removeprefix("meta."))
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    user_id = str(value)
    if not user_id or not storable_id(user_id):
        return None
    return UserKey(sdk_app_id or "", profile, user_id)


def with_summary(
    loaded: Sequence[StoredRound], window: Sequence[StoredRound], view: MemoryView, next_seq: int, window_rounds: int
) -> tuple[list[StoredRound], int | None]:
    """The rounds a context with the summary carries, and the round to fold up to now (None: no
    fold yet).

    Rounds are folded ahead, in batches: once the window is full and the summary reaches at most
    one round into it, every finished round but the newest is folded (the newest may still be
    cut by its 905). The summary then covers the window's older rounds too, so for the next
    `window_rounds - 2` rounds nothing leaves the window that the summary lacks: the context is
    the summary and the window, no larger than without memory, and a fold runs once per that
    many rounds. Until a fold lands, the rounds between the summary and the window (at most
    MAX_BEHIND, newest kept) are carried before the window.

    `loaded` is newest first (as read), `window` oldest first."""
    oldest = window[0].seq if window else next_seq
    behind = [stored for stored in loaded if view.through_seq < stored.seq < oldest][:MAX_BEHIND]
    rounds = [*reversed(behind), *window]
    full = len(loaded) > len(window) or len(window) >= window_rounds
    due = view.stale or (full and view.through_seq - (oldest - 1) <= 1)
    up_to = next_seq - 2
    return rounds, up_to if due and (up_to > view.through_seq or view.stale) and up_to > 0 else None
