"""HTTP tools, declared in a JSON file (`TOOLS_FILE`) for teams who would rather not write Python:

    {"tools": [{"name": "order_status", "description": "...",
                "parameters": {"type": "object", "properties": {...}, "required": [...]},
                "url": "https://shop.internal/api/orders/status", "method": "GET",
                "headers": {"Authorization": "Bearer ${SHOP_TOKEN}"}, "timeout_s": 5}]}

GET sends the arguments as query parameters, other methods as a JSON body. `${VAR}` in a URL or
header value is read from the environment, so secrets stay out of the file. The response body
(JSON or text) is what the model gets; an HTTP error status becomes an error result.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx

from llm_proxy.tools.registry import Tool, ToolConfigError

_ENV_VAR = re.compile(r"\$\{(\w+)\}")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def load_http_tools(path: Path, client: httpx.AsyncClient) -> list[Tool]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ToolConfigError(f"TOOLS_FILE {path}: {exc}") from exc
    entries = config.get("tools") if isinstance(config, dict) else None
    if not isinstance(entries, list):
        raise ToolConfigError(f'TOOLS_FILE {path}: expected {{"tools": [...]}}')
    return [_http_tool(entry, client, f"{path}#{n}") for n, entry in enumerate(entries)]


def _http_tool(entry: Any, client: httpx.AsyncClient, where: str) -> Tool:
    if not isinstance(entry, dict):
        raise ToolConfigError(f"{where}: each tool is an object")
    missing = [key for key in ("name", "description", "url") if not entry.get(key)]
    if missing:
        raise ToolConfigError(f"{where}: missing {', '.join(missing)}")
    name = entry["name"]
    if not _NAME.match(name):
        raise ToolConfigError(f"{where}: tool name {name!r} must be 1-64 letters, digits, _ or -")
    method = str(entry.get("method", "POST")).upper()
    parameters = entry.get("parameters") or {"type": "object", "properties": {}}
    url = _expand(entry["url"], where)
    headers = {key: _expand(str(value), where) for key, value in (entry.get("headers") or {}).items()}

    async def run(arguments: dict[str, Any]) -> Any:
        if method == "GET":
            response = await client.request(method, url, params=arguments, headers=headers)
        else:
            response = await client.request(method, url, json=arguments, headers=headers)
        if response.status_code >= 400:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            return response.text

    timeout = entry.get("timeout_s")
    return Tool(name, entry["description"], parameters, run, float(timeout) if timeout else None, source=f"http {where}")


def _expand(value: str, where: str) -> str:
    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ToolConfigError(f"{where}: environment variable {name} is not set")
        return os.environ[name]

    return _ENV_VAR.sub(variable, value)
