"""The app factory: routers per domain, resources opened once in the lifespan."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from app import health
from app.auth import resolve_api_keys
from app.db import Database
from app.errors import install_error_handlers
from app.logs import RequestContextMiddleware, configure_logging
from app.settings import Settings, get_settings
from llm_proxy.api_router import router as llm_router
from llm_proxy.serving import ChatService
from llm_proxy.upstream import Upstream


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(
            settings.resolved_database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        upstream = Upstream(settings.upstream_base_url, settings.upstream_api_key, settings.upstream_timeout_s)
        app.state.db = db
        app.state.api_keys = resolve_api_keys(settings.api_key_list, settings.data_dir)
        app.state.chat = ChatService(settings, db, upstream)
        # Everything imported and built so far lives as long as the process: keep it out of the
        # cyclic collector's full passes, which otherwise walk it again and again mid-request.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await upstream.aclose()
            await db.dispose()

    app = FastAPI(title="trtc-backend", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(llm_router)
    return app
