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

# Rounds folded into a summary at a time, at most. Folding in batches keeps the memory upstream
# and its four short transactions off all but one round in ten; the rounds of a batch not folded
# yet stay in the context meanwhile, so nothing falls between the summary and the window.
FOLD_EVERY = 10


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


def fold_every(window_rounds: int, readable_rounds: int) -> int:
    """Rounds per fold for a window of `window_rounds`: at most FOLD_EVERY, at most the window
    (the context never holds more than twice it), and no more than the rounds a claim reads
    beyond the window (`HISTORY_MAX_ROUNDS`), which is where the not-yet-folded ones come from."""
    return max(1, min(FOLD_EVERY, window_rounds, readable_rounds - window_rounds))


def with_summary(
    loaded: Sequence[StoredRound], window: Sequence[StoredRound], view: MemoryView, next_seq: int, every: int
) -> tuple[list[StoredRound], int | None]:
    """The rounds a context with the summary carries: the window, and before it the rounds the
    summary does not cover yet (at most `every`, newest kept); and the round to fold up to, once
    a batch of `every` rounds is waiting (or the summary is being redone), else None.

    `loaded` is newest first (as read), `window` oldest first."""
    oldest = window[0].seq if window else next_seq
    behind = [stored for stored in loaded if view.through_seq < stored.seq < oldest][:every]
    rounds = [*reversed(behind), *window]
    due = view.stale or oldest - 1 - view.through_seq >= every
    return rounds, oldest - 1 if due and oldest > 1 else None
