"""Builds the tool registry at start-up from every source, in one place."""

from __future__ import annotations

import httpx

from core.settings import Settings
from llm_proxy.tools.builtins import builtin_tools
from llm_proxy.tools.http_tools import load_http_tools
from llm_proxy.tools.python_tools import load_entry_points, load_modules
from llm_proxy.tools.registry import ToolConfigError, ToolRegistry


def load_tools(settings: Settings, http: httpx.AsyncClient) -> tuple[ToolRegistry, ToolRegistry]:
    """Every tool, and the server's default selection of them (TOOLS_ENABLED, else every tool but
    the built-ins unless BUILTIN_TOOLS); a profile may select others from the first. The
    built-ins are always there to be named (a profile or TOOLS_ENABLED naming `current_time`
    turns it on); with BUILTIN_TOOLS off, a tool of yours with a built-in's name takes its place."""
    tools = load_entry_points()
    tools += load_modules(settings.tools_module_list)
    if settings.tools_file:
        tools += load_http_tools(settings.tools_file, http)
    own = {tool.name for tool in tools}
    builtins = builtin_tools(settings.faq_file)
    if not settings.builtin_tools:
        builtins = [tool for tool in builtins if tool.name not in own]
    registry = ToolRegistry([*builtins, *tools], default_timeout_s=settings.tool_timeout_s)
    enabled = settings.tools_enabled_list
    if enabled is None:
        defaults = [*(tool.name for tool in builtins if settings.builtin_tools), *(tool.name for tool in tools)]
        return registry, registry.narrowed(defaults)
    try:
        return registry, registry.narrowed(enabled)
    except ToolConfigError as exc:
        raise ToolConfigError(f"TOOLS_ENABLED names {exc}") from None
