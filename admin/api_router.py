"""The admin API's routes, behind `ADMIN_API_KEYS` (separate from the chat and TTS keys). With no
admin key configured the routes do not exist for anyone: every request gets 404."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from admin.queries import TaskFilter, as_utc, decode_cursor, list_tasks, stats, task_detail, user_memories
from core.auth import is_authorized
from core.errors import ApiError, bad_request, not_found, unauthorized
from llm_proxy.models import ID_MAX_CHARS, NO_APP, storable_id

log = logging.getLogger("trtc.admin")
router = APIRouter()


def require_enabled(request: Request) -> list[str]:
    """The admin keys; with none set, the admin API and the console do not exist (404)."""
    keys: list[str] = request.app.state.settings.admin_api_key_list
    if not keys:
        raise not_found()
    return keys


def authorize(request: Request) -> None:
    if not is_authorized(request.headers.get("authorization"), require_enabled(request)):
        raise unauthorized("Missing or invalid admin key (Authorization: Bearer <a key from ADMIN_API_KEYS>).")


# The times the API takes: anything a stored row can have, with room for a day either side.
_EARLIEST = datetime(1970, 1, 2, tzinfo=timezone.utc)
_LATEST = datetime(9999, 12, 30, tzinfo=timezone.utc)


def _moment(request: Request, name: str) -> datetime | None:
    """An ISO 8601 time; without an offset it is taken as UTC (what every stored time is in)."""
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        moment = as_utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise bad_request(
            f"`{name}` must be an ISO 8601 time (e.g. 2026-11-27T08:00:00Z; without an offset, UTC), not {value[:64]!r}.",
            "invalid_time",
        ) from None
    if not _EARLIEST <= moment <= _LATEST:
        raise bad_request(f"`{name}` must lie between 1970 and 9999, not {value[:64]!r}.", "invalid_time")
    return moment


def _identifier(value: str | None, name: str) -> str | None:
    """A filter on a stored identifier: no stored one is longer or holds NUL (which PostgreSQL
    refuses in a query), so such a value is refused here."""
    if value is not None and not storable_id(value):
        raise bad_request(f"`{name}` is at most {ID_MAX_CHARS} characters, without NUL.", "invalid_identifier")
    return value


@router.get("/admin/v1/tasks")
async def tasks(request: Request) -> Any:
    authorize(request)
    params = request.query_params
    try:
        limit = int(params.get("limit", "50"))
    except ValueError:
        raise bad_request("`limit` must be a whole number from 1 to 500.", "invalid_limit") from None
    if not 1 <= limit <= 500:
        raise bad_request("`limit` must be a whole number from 1 to 500.", "invalid_limit")
    try:
        cursor = decode_cursor(params["cursor"]) if "cursor" in params else None
    except ValueError:
        raise bad_request("`cursor` is not one this API handed out.", "invalid_cursor") from None
    where = TaskFilter(
        user_id=_identifier(params.get("user_id"), "user_id"), room_id=_identifier(params.get("room_id"), "room_id"),
        sdk_app_id=_identifier(params.get("sdk_app_id"), "sdk_app_id"),
        since=_moment(request, "since"), until=_moment(request, "until"),
    )
    page, next_cursor = await request.app.state.db.run(list_tasks, where, limit, cursor)
    return JSONResponse({"data": page, "next_cursor": next_cursor})


@router.get("/admin/v1/tasks/{task_id:path}")
async def task(request: Request, task_id: str) -> Any:
    authorize(request)
    detail = await request.app.state.db.run(task_detail, task_id) if storable_id(task_id) else None
    if detail is None:
        raise _no_task(task_id)
    return JSONResponse(detail)


@router.delete("/admin/v1/tasks/{task_id:path}")
async def delete_task(request: Request, task_id: str) -> Any:
    authorize(request)
    if not storable_id(task_id) or not await request.app.state.lifecycle.delete_tasks([task_id]):
        raise _no_task(task_id)
    log.info("admin: deleted task", extra={"task_id": task_id})
    return JSONResponse({"deleted": {"tasks": [task_id]}})


def _user(sdk_app_id: str, user_id: str) -> tuple[str, str] | None:
    """The user the path names, as stored; None when no user could have such ids."""
    app = "" if sdk_app_id == NO_APP else sdk_app_id
    return (app, user_id) if storable_id(app) and storable_id(user_id) else None


@router.delete("/admin/v1/users/{sdk_app_id}/{user_id:path}")
async def delete_user(request: Request, sdk_app_id: str, user_id: str) -> Any:
    """Every task of the user (and what belongs to them). A user with nothing stored is not an
    error: the request's aim, nothing stored for them, holds."""
    authorize(request)
    user = _user(sdk_app_id, user_id)
    gone, memories = await request.app.state.lifecycle.delete_user(*user) if user else ([], 0)
    log.info("admin: deleted %d task(s) and %d memories of a user", len(gone), memories,
             extra={"sdk_app_id": sdk_app_id, "user_id": user_id})
    return JSONResponse({"deleted": {"tasks": gone, "memories": memories}})


@router.get("/admin/v1/users/{sdk_app_id}/{user_id:path}/memory")
async def user_memory(request: Request, sdk_app_id: str, user_id: str) -> Any:
    """What is remembered of the user, per profile (`memory.per_user`); none is an empty list."""
    authorize(request)
    user = _user(sdk_app_id, user_id)
    data = await request.app.state.db.run(user_memories, *user) if user else []
    return JSONResponse({"sdk_app_id": sdk_app_id, "user_id": user_id, "data": data})


@router.get("/admin/v1/stats")
async def round_stats(request: Request) -> Any:
    authorize(request)
    until = _moment(request, "until") or datetime.now(timezone.utc)
    since = _moment(request, "since") or until - timedelta(hours=24)
    if not timedelta(0) < until - since <= _STATS_MAX_RANGE:
        raise bad_request("`since` must come before `until`, at most 31 days before it.", "invalid_range")
    return JSONResponse(await request.app.state.db.run(stats, since, until))


_STATS_MAX_RANGE = timedelta(days=31)


def _no_task(task_id: str) -> ApiError:
    return ApiError(404, f"No task {task_id[:300]!r}.", "invalid_request_error", "task_not_found")
