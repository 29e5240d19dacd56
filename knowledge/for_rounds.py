"""What a chat round takes from the knowledge bases its profile lists.

`auto`: the user's turn is the query (a short follow-up such as "那价格呢" is searched together
with the user's turn before it, the new words counting double); small talk is not searched. The
passages go to the model in a system section just before the user turn, or where the prompt
template says `{knowledge}`; they are never stored in the history, so each round searches
afresh, and the next round's context carries no stale passages. `tool`: the model is offered
`search_knowledge`, which the proxy runs like its other tools. Either way the passages a round
used are recorded with it (base, document, chunk, score).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

from core.metrics import KNOWLEDGE_SEARCHES
from knowledge.index import tokenize
from knowledge.retrieval import MAX_QUERY_CHARS, Knowledge, Passage
from llm_proxy.profiles import KnowledgeConfig
from llm_proxy.tools.registry import Tool, round_findings

log = logging.getLogger("trtc.knowledge")
SECTION_HEADING = (
    "Knowledge for the user's next message, from the knowledge base. Answer from these passages; if they do not "
    "answer it, say you do not know rather than guess. Speak the answer naturally: never read out passage numbers, "
    "document names, ids or links."
)
TOOL_NAME = "search_knowledge"
# A turn this short (in terms) is a follow-up: it is searched with the user's turn before it.
FOLLOW_UP_TERMS = 8
_SMALL_TALK = frozenset(
    """好 好的 好吧 好啊 嗯 嗯嗯 哦 噢 对 对的 是 是的 行 可以 没问题 谢谢 谢谢你 多谢 感谢 再见 拜拜 你好 您好 喂 在吗 在不在
    哈哈 哈哈哈 不用了 没有了 知道了 明白了 了解 ok okay thanks thank you thx yes yeah yep no nope bye goodbye hi hello hey
    sure great cool fine alright right hmm mhm""".split()
)
_SMALL_TALK_PHRASES = frozenset({"thank you", "no thanks", "ok thanks", "okay thanks", "good bye", "see you"})


def is_small_talk(text: str) -> bool:
    """Greetings, thanks, yes and no: nothing a knowledge base answers."""
    cleaned = re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).lower()).strip()
    return not cleaned or cleaned in _SMALL_TALK_PHRASES or all(word in _SMALL_TALK for word in cleaned.split())


def query_terms(turn: str, previous: str | None) -> list[str]:
    """The search terms of a turn: its own, and for a short follow-up also the previous turn's
    (the new words weigh double)."""
    return _search_terms(turn, previous)[0]


def _search_terms(turn: str, previous: str | None) -> tuple[list[str], bool]:
    """`query_terms`, and whether the previous turn is among them."""
    terms = tokenize(turn)
    if previous and len(terms) <= FOLLOW_UP_TERMS:
        return [*terms, *terms, *tokenize(previous)], True
    return terms, False


def section(passages: Sequence[Passage], max_chars: int) -> str:
    """The passages as the model reads them, at most `max_chars` characters of them (the first
    always, cut if it must be)."""
    parts: list[str] = []
    used = 0
    for number, passage in enumerate(passages, 1):
        body = f"[{number}] {passage.heading}\n{passage.text}" if passage.heading else f"[{number}] {passage.text}"
        if used + len(body) > max_chars:
            if parts:
                break
            body = body[:max_chars]
        parts.append(body)
        used += len(body)
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Found:
    passages: list[Passage]
    # What the model reads: the heading and the passages.
    text: str

    def records(self) -> list[dict[str, object]]:
        return [p.record() for p in self.passages]


class RoundKnowledge:
    """The knowledge source of chat rounds (wired by the app into `ChatService.knowledge`)."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge

    async def for_turn(self, config: KnowledgeConfig, turn: str, previous: str | None) -> Found | None:
        """The passages for a user turn in `auto` mode; None when the turn needs none (small talk) or
        nothing matched."""
        turn, previous = turn[:MAX_QUERY_CHARS], previous[:MAX_QUERY_CHARS] if previous else None
        if is_small_talk(turn):
            KNOWLEDGE_SEARCHES.labels("skipped").inc()
            return None
        terms, follow_up = _search_terms(turn, previous)
        query = f"{turn}\n{previous}" if follow_up else turn
        try:
            passages = await self.knowledge.search(config.bases, query, config.top_k, config.min_score, terms=terms)
        except Exception as exc:  # the round goes on without passages rather than failing
            KNOWLEDGE_SEARCHES.labels("failed").inc()
            log.error("knowledge search failed: %s: %s; the round goes on without passages", type(exc).__name__, exc)
            return None
        KNOWLEDGE_SEARCHES.labels("found" if passages else "none").inc()
        if not passages:
            return None
        return Found(passages, f"{SECTION_HEADING}\n\n{section(passages, config.max_chars)}")

    def tool(self, config: KnowledgeConfig) -> Tool:
        """`search_knowledge` over the profile's bases."""
        knowledge = self.knowledge

        async def run(arguments: dict[str, Any]) -> Any:
            query = str(arguments.get("query") or "")[:500]
            passages = await knowledge.search(config.bases, query, config.top_k, config.min_score)
            KNOWLEDGE_SEARCHES.labels("tool").inc()
            findings = round_findings.get()
            if findings is not None:
                findings += [p.record() for p in passages]
            if not passages:
                return {"passages": [], "note": "Nothing in the knowledge base matches; say so honestly."}
            return {"passages": [{"heading": p.heading, "text": p.text} for p in passages],
                    "note": "Answer from these; never read out ids or links."}

        return Tool(
            name=TOOL_NAME,
            description="Search the knowledge base (product documentation, FAQ, policies) for passages that answer "
                        "the user's question. Use it for any factual question about the product or service.",
            parameters={
                "type": "object",
                "properties": {"query": {"type": "string", "description": "What to look for, in the user's words.",
                                         "maxLength": 500}},
                "required": ["query"],
            },
            run=run,
            source="knowledge",
        )
