"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.engine import Connection

from core import metrics
from migrations import head_revision

router = APIRouter()
log = logging.getLogger("trtc.health")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and its schema is at this code's migration head (the TTS
    server alone needs no database; its voices are loaded before the server accepts requests)."""
    if request.app.state.db is None:
        return JSONResponse({"status": "ok"})
    expected = head_revision()
    try:
        async with asyncio.timeout(2):
            current = await request.app.state.db.run(_schema_revision)
    except Exception as exc:  # any failure means "not ready", with the reason
        log.warning("database not ready: %s", exc)
        return _unavailable(f"{type(exc).__name__}: {exc}; run `trtc-backend db upgrade` if the schema is missing")
    if current != expected:
        return _unavailable(f"schema at revision {current}, expected {expected}: run `trtc-backend db upgrade`")
    return JSONResponse({"status": "ok", "database": "ok"})


def _schema_revision(conn: Connection) -> str | None:
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _unavailable(reason: str) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "database": reason}, status_code=503)


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
