"""Built-in tools: the current time in a time zone, and a FAQ lookup over a local file (the
customer-service case; point `FAQ_FILE` at your own entries)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from llm_proxy.tools.python_tools import as_tool
from llm_proxy.tools.registry import Tool, ToolConfigError

SAMPLE_FAQ = Path(__file__).with_name("sample_faq.json")
_WORD = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]")
_STOP = frozenset("a an and are can do does for how i in is it my of on or the to what when where which who why you your".split())


def current_time(timezone: str = "UTC") -> dict[str, str]:
    """The current date and time in an IANA time zone such as "Asia/Shanghai" or "Europe/Berlin"."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {timezone!r}; use an IANA name like 'Asia/Shanghai'") from exc
    now = datetime.now(zone)
    return {"timezone": timezone, "datetime": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A")}


def _tokens(text: str) -> set[str]:
    return {token for token in _WORD.findall(text.lower()) if token not in _STOP}


def faq_tool(path: Path) -> Tool:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        indexed = [(_tokens(e["question"] + " " + " ".join(e.get("keywords", []))), e) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ToolConfigError(f"FAQ_FILE {path}: {exc} (expected {{\"entries\": [{{\"question\", \"answer\"}}]}})") from exc

    def faq_lookup(question: str) -> dict[str, object]:
        """Look up the customer-service FAQ: the entries that best match the user's question."""
        asked = _tokens(question)
        scored = sorted(((len(asked & tokens), entry) for tokens, entry in indexed), key=lambda pair: -pair[0])
        matches = [{"question": e["question"], "answer": e["answer"]} for score, e in scored[:2] if score > 0]
        return {"matches": matches} if matches else {"matches": [], "note": "No FAQ entry matches; say so honestly."}

    return as_tool(faq_lookup, source="built-in")


def builtin_tools(faq_file: Path | None) -> list[Tool]:
    return [as_tool(current_time, source="built-in"), faq_tool(faq_file or SAMPLE_FAQ)]
