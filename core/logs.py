"""JSON-lines logging that stamps every record with the current task and request ids.

The ids live in context variables set by `RequestContextMiddleware`, so any code on the request's
path (store, upstream, errors) logs them without passing them around.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

task_id_var: ContextVar[str | None] = ContextVar("task_id", default=None)
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        task_id = task_id_var.get()
        if task_id is not None:
            entry["task_id"] = task_id
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # One structured line per request is written by the middleware instead.
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("httpx", "httpcore", "openai", "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def request_id(headers: Mapping[str, str]) -> str | None:
    """The orchestrator's request id; one page of its docs spells the header `X-Rquest-Id`."""
    return headers.get("x-request-id") or headers.get("x-rquest-id")


_access_log = logging.getLogger("trtc.access")


class RequestContextMiddleware:
    """Pure ASGI middleware: binds task/request ids to the context and logs one access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        task_token = task_id_var.set(headers.get("x-task-id"))
        request_token = request_id_var.set(request_id(headers))
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _access_log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={"status": status, "ms": round((time.perf_counter() - started) * 1000, 2)},
            )
            task_id_var.reset(task_token)
            request_id_var.reset(request_token)
