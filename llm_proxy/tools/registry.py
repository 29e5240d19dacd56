"""The tool registry: every tool the proxy can run, by name, whatever it is made of.

A `Tool` is a name, a description, a JSON-schema of its parameters and an async `run(args)` that
returns text for the model. Python tools (LangChain tools or plain typed functions) and HTTP tools
(declared in a file) all become one. `run_call` is the one way a call is executed: arguments are
parsed and checked against the schema, the tool runs with a timeout, and every failure becomes an
error result the model can work with, never an exception for the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import jsonschema

log = logging.getLogger("trtc.tools")

# A tool's answer is cut to this many characters: the model reads it, and so does every later
# round's context.
MAX_RESULT_CHARS = 8000

# What the tools of the round running now found that the round records with it (the knowledge
# passages `search_knowledge` gave the model): set by the round around its tool calls.
round_findings: ContextVar[list[dict[str, Any]] | None] = ContextVar("round_findings", default=None)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], Awaitable[Any]]
    timeout_s: float | None = None
    source: str = "python"

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class ToolConfigError(Exception):
    """A tool set that cannot start: a name used twice, a bad HTTP tool entry, a module that
    does not import."""


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool], *, default_timeout_s: float) -> None:
        self._tools: dict[str, Tool] = {}
        self.default_timeout_s = default_timeout_s
        for tool in tools:
            if tool.name in self._tools:
                raise ToolConfigError(
                    f"Two tools are named {tool.name!r} ({self._tools[tool.name].source} and {tool.source}); "
                    "tool names must be unique."
                )
            self._tools[tool.name] = tool
        # Sent with every request: built once.
        self._schemas = [tool.openai_schema() for tool in self._tools.values()]

    def narrowed(self, allowed: list[str]) -> ToolRegistry:
        """Only the named tools (an unknown name is a configuration error)."""
        unknown = [name for name in allowed if name not in self._tools]
        if unknown:
            raise ToolConfigError(f"unknown tools: {', '.join(unknown)}; have: {', '.join(self._tools) or 'none'}")
        return ToolRegistry([self._tools[name] for name in allowed], default_timeout_s=self.default_timeout_s)

    def with_tool(self, tool: Tool) -> ToolRegistry:
        """These tools and one more (a name clash is a configuration error)."""
        return ToolRegistry([*self._tools.values(), tool], default_timeout_s=self.default_timeout_s)

    def schemas(self) -> list[dict[str, Any]]:
        return self._schemas

    async def run_call(self, name: str, raw_arguments: str) -> str:
        """Run one call and return what the model gets back: the tool's result, or an error
        object it can read (`{"error": ...}`)."""
        tool = self._tools.get(name)
        if tool is None:
            return _error(f"There is no tool named {name!r}.")
        try:
            arguments = json.loads(raw_arguments or "{}")
        except json.JSONDecodeError as exc:
            return _error(f"The arguments are not valid JSON ({exc.msg}); send a JSON object matching the schema.")
        if not isinstance(arguments, dict):
            return _error("The arguments must be a JSON object.")
        try:
            jsonschema.validate(arguments, tool.parameters)
        except jsonschema.ValidationError as exc:
            return _error(f"The arguments do not match the schema: {exc.message}.")
        timeout = tool.timeout_s or self.default_timeout_s
        try:
            async with asyncio.timeout(timeout):
                result = await tool.run(arguments)
        except TimeoutError:
            log.warning("tool %s timed out after %.1fs", name, timeout)
            return _error(f"The tool did not answer within {timeout:g} s.")
        except Exception as exc:  # the model hears of it; the client never sees a 500
            log.warning("tool %s failed: %s: %s", name, type(exc).__name__, exc)
            return _error(f"The tool failed: {type(exc).__name__}: {exc}")
        return _as_text(result)


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def _as_text(result: Any) -> str:
    if isinstance(result, str):
        text = result
    else:
        try:
            text = json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return _error("The tool returned something that is not text or JSON.")
    return text[:MAX_RESULT_CHARS]
