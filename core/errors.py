"""OpenAI-shaped errors: `{"error": {"message", "type", "code"}}` with a fitting status.

Every failure the chat proxy reports goes through `ApiError`, so the status code, the body shape
and the log line (with task and request ids, from the logging context) are decided in one place.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

log = logging.getLogger("trtc.errors")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def not_found() -> ApiError:
    return ApiError(404, "Not Found", "invalid_request_error", "not_found")


def unauthorized(message: str = "Missing or invalid API key (Authorization: Bearer <key>).") -> ApiError:
    return ApiError(401, message, "invalid_request_error", "invalid_api_key")


def error_response(error: ApiError) -> JSONResponse:
    level = logging.WARNING if error.status < 500 else logging.ERROR
    log.log(level, "%s %s", error.status, error.message, extra={"code": error.code})
    return JSONResponse(error.body(), status_code=error.status)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(bad_request(f"Invalid request: {exc.errors()}"))

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(
            ApiError(exc.status_code, str(exc.detail), "invalid_request_error", code)
        )

    async def on_database(_request: Request, exc: Exception) -> JSONResponse:
        log.error("database error: %s", exc)
        return error_response(
            ApiError(
                503,
                "Database unavailable (or not migrated: run `trtc-backend db upgrade`); nothing was stored.",
                "server_error",
                "database_unavailable",
            )
        )

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            ApiError(500, "Internal server error.", "server_error", "internal_error").body(),
            status_code=500,
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(SQLAlchemyError, on_database)
    app.add_exception_handler(ConnectionError, on_database)
    app.add_exception_handler(Exception, on_unexpected)
