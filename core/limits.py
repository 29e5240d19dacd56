"""Request limits: a body over `MAX_REQUEST_BYTES` is refused as soon as its `Content-Length` (or its
bytes so far) say so, never read whole into memory; a JSON body is parsed strictly and to a bounded
depth (`parse_json`), so no body can exhaust the stack or carry text no database stores."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

# Deeper JSON than any request of these protocols has (a chat body is about 6 levels deep; tool
# schemas a few more): deeper nesting is refused rather than walked by code that recurses.
MAX_JSON_DEPTH = 64


class BodyTooLarge(Exception):
    """Each service answers it with a 413 in its own protocol's error shape."""

    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than this server's limit of {limit} bytes (MAX_REQUEST_BYTES).")
        self.limit = limit


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class InvalidJson(ValueError):
    """Not JSON, or JSON this server refuses; each service answers it in its own error shape."""


def parse_json(raw: bytes) -> Any:
    """`raw` as JSON. Strict (orjson): invalid UTF-8, lone surrogates (`"\\ud800"`), NaN and
    numbers beyond a double are refused, as no database stores such text and no upstream takes
    it; and no deeper than `MAX_JSON_DEPTH`."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"not valid JSON (or text with a lone surrogate): {exc}") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise InvalidJson(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Walked with a stack of its own: a recursive walk is what deep nesting breaks."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
