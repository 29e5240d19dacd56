"""Python tools: LangChain tools, or plain typed functions (their signature and docstring become
the JSON schema), found in `TOOLS_MODULES` and in the `trtc_backend.tools` entry-point group.

A module (or an entry point) provides tools as a module-level `TOOLS` list, or, without one,
every LangChain tool defined at its top level.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable

from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from llm_proxy.tools.registry import Tool, ToolConfigError

ENTRY_POINT_GROUP = "trtc_backend.tools"


def as_tool(obj: BaseTool | Callable[..., Any], *, source: str = "python") -> Tool:
    """A LangChain tool, or a typed function with a docstring, as a registry `Tool`."""
    if isinstance(obj, BaseTool):
        lc_tool = obj
    elif inspect.iscoroutinefunction(obj):
        lc_tool = StructuredTool.from_function(coroutine=obj)
    else:
        lc_tool = StructuredTool.from_function(obj)
    function = convert_to_openai_tool(lc_tool)["function"]

    async def run(arguments: dict[str, Any]) -> Any:
        return await lc_tool.ainvoke(arguments)

    return Tool(
        name=function["name"],
        description=function.get("description", ""),
        parameters=function.get("parameters") or {"type": "object", "properties": {}},
        run=run,
        source=source,
    )


def tools_from_module(module: ModuleType) -> list[Tool]:
    source = f"module {module.__name__}"
    provided = getattr(module, "TOOLS", None)
    if provided is None:
        provided = [value for _, value in inspect.getmembers(module) if isinstance(value, BaseTool)]
    return [as_tool(obj, source=source) for obj in provided]


def load_modules(names: list[str]) -> list[Tool]:
    tools: list[Tool] = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ToolConfigError(f"TOOLS_MODULES: cannot import {name!r}: {exc}") from exc
        tools += tools_from_module(module)
    return tools


def load_entry_points() -> list[Tool]:
    """Installed packages add tools with an entry point in the `trtc_backend.tools` group that
    names a module, a list of tools, or one tool."""
    tools: list[Tool] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        target = entry.load()
        source = f"entry point {entry.name}"
        if isinstance(target, ModuleType):
            tools += tools_from_module(target)
        elif isinstance(target, (list, tuple)):
            tools += [as_tool(obj, source=source) for obj in target]
        else:
            tools.append(as_tool(target, source=source))
    return tools
