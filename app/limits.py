"""Request size limits, checked while the body arrives: a body over `MAX_REQUEST_BYTES` is refused
as soon as its `Content-Length` (or its bytes so far) say so, never read whole into memory."""

from __future__ import annotations

from starlette.requests import Request


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
