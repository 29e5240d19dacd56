"""The app factory: routers per domain, resources opened once in the lifespan.

`SERVICES` (set by `trtc-backend serve --only`) picks what this process serves: the chat proxy
(`llm`), the TTS server (`tts`), or both (`all`), so operators can scale them separately.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI

from app import health
from core.auth import resolve_api_keys
from core.db import Database
from core.errors import install_error_handlers
from core.logs import RequestContextMiddleware, configure_logging
from core.settings import Settings, get_settings


log = logging.getLogger("trtc.app")
# How long voices replaced by a reload keep their remote engines' connections open for the
# streams still speaking with them.
_OLD_VOICES_KEPT_S = 300.0


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.db = None
        app.state.tts = None
        api_keys = resolve_api_keys(settings.api_key_list, settings.data_dir)
        # What SIGHUP reloads (the profiles, the voices): each service adds its own.
        reloaders: list[Callable[[], None]] = []
        async with AsyncExitStack() as stack:
            if settings.serves_llm:
                await _open_chat(app, settings, api_keys, stack, reloaders)
            if settings.serves_tts:
                await _open_tts(app, settings, api_keys, stack, reloaders)
            # Signals reach only the main thread: an app served from another thread (embedded in
            # a program, or the tests' in-process servers) is reloaded by restarting it.
            if threading.current_thread() is threading.main_thread():
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGHUP, lambda: [reload() for reload in reloaders])
                stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            # Everything imported and built so far lives as long as the process: keep it out of
            # the cyclic collector's full passes, which otherwise walk it again and again.
            gc.collect()
            gc.freeze()
            # Young collections less often, full ones much less often: a full pass walks every
            # cached history round (its langchain messages too) and stalled all requests for up
            # to 35 ms at 45 rounds/s, the proxy's p99. Nearly all garbage here is acyclic and
            # freed by reference counting; cycles still go, in the young or a (rarer) full pass.
            gc.set_threshold(10_000, 50, 100)
            yield

    app = FastAPI(title="trtc-backend", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    app.include_router(health.router)
    # Each service is imported only by the processes that serve it: the chat proxy's modules take
    # 1.9 s to import (langchain-openai), which a `--only tts` process (0.4 s) never pays.
    if settings.serves_llm:
        from admin.api_router import router as admin_router
        from admin.console_router import router as console_router
        from knowledge.api_router import router as knowledge_router
        from llm_proxy.api_router import router as llm_router
        from orchestrator.api_router import router as callback_router

        app.include_router(llm_router)
        app.include_router(callback_router)
        app.include_router(admin_router)
        app.include_router(knowledge_router)
        app.include_router(console_router)
    if settings.serves_tts:
        from openai_speech.api_router import router as speech_router
        from tts_server.api_router import router as tts_router

        app.include_router(tts_router)
        app.include_router(speech_router)
    return app


async def _open_chat(
    app: FastAPI, settings: Settings, api_keys: list[str], stack: AsyncExitStack, reloaders: list[Callable[[], None]]
) -> None:
    # Imported here, not at the top: see `create_app` (a `--only tts` process never loads them).
    import httpx

    from admin.lifecycle import RETENTION, Lifecycle
    from knowledge.embeddings import Embedders
    from knowledge.for_rounds import RoundKnowledge
    from knowledge.retrieval import Knowledge
    from llm_proxy.agents import Agents, UpstreamClients, build_agents
    from llm_proxy.profiles import ConfigError, load_profiles
    from llm_proxy.recovery import Lease
    from llm_proxy.serving import ChatService
    from llm_proxy.tools.loader import load_tools
    from llm_proxy.tools.registry import ToolConfigError
    from memory.keeper import Keeper
    from orchestrator.callbacks import CallbackService

    db = Database(settings.resolved_database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
                  wal_max_mb=settings.sqlite_wal_max_mb)
    stack.push_async_callback(db.dispose)
    lease = Lease(db, settings.instance_lease_s, chores=RETENTION if settings.retention_days else None)
    await lease.start()
    stack.push_async_callback(lease.stop)
    clients = UpstreamClients(settings)
    stack.push_async_callback(clients.aclose)
    app.state.db = db
    tool_http = httpx.AsyncClient(timeout=settings.tool_timeout_s)
    stack.push_async_callback(tool_http.aclose)
    all_tools, default_tools = load_tools(settings, tool_http)
    knowledge = Knowledge(db)
    await knowledge.start()
    stack.push_async_callback(knowledge.stop)
    app.state.knowledge = knowledge
    embedders = Embedders()
    stack.push_async_callback(embedders.aclose)
    round_knowledge = RoundKnowledge(knowledge)

    def agents() -> Agents:
        profiles = load_profiles(settings, api_keys)
        built = build_agents(profiles, all_tools, default_tools, clients, round_knowledge.tool)
        knowledge.embedders = embedders.for_bases(profiles.knowledge_bases)
        knowledge.in_use = frozenset(base for p in profiles.all if p.knowledge for base in p.knowledge.bases)
        return built

    chat = ChatService(settings, db, agents(), lease)
    chat.context.knowledge = round_knowledge
    memory = Keeper(db, clients, lambda: chat.agents, lease.id, settings.history_cache_tasks,
                    settings.memory_user_idle_s, settings.memory_fold_timeout_s)
    await memory.start()
    stack.push_async_callback(memory.stop)
    chat.context.memory = memory
    app.state.chat = chat
    lifecycle = Lifecycle(
        db, [chat.history.drop, memory.forget], settings.retention_days, settings.retention_interval_s, lease.id
    )
    await lifecycle.start()
    stack.push_async_callback(lifecycle.stop)
    app.state.lifecycle = lifecycle
    callbacks = CallbackService(db, chat.history, settings.callback_hold_s)
    stack.push_async_callback(callbacks.stop)
    chat.on_held = callbacks.apply_held
    callbacks.on_task_ended = memory.task_ended
    app.state.callbacks = callbacks
    if not settings.callback_sign_key and settings.callback_allow_unsigned:
        log.warning(
            "callbacks are accepted unsigned (CALLBACK_ALLOW_UNSIGNED=true, no CALLBACK_SIGN_KEY): "
            "anyone who reaches /api/v1/trtc/callback can write events; set the key in the TRTC console and here"
        )

    def reload() -> None:
        """SIGHUP: new rounds get the profiles as the file now says; rounds in flight keep
        theirs. A file that does not load leaves the old profiles in place."""
        try:
            chat.agents = agents()
        except (ConfigError, ToolConfigError) as exc:
            log.error("SIGHUP: %s; the profiles in use stay", exc)
            return
        log.info("SIGHUP: profiles reloaded: %s", ", ".join(p.name for p in chat.agents.profiles.all))

    reloaders.append(reload)


async def _open_tts(
    app: FastAPI, settings: Settings, api_keys: list[str], stack: AsyncExitStack, reloaders: list[Callable[[], None]]
) -> None:
    # Imported here: a `--only llm` process never loads piper, onnxruntime or the grammars.
    from tts_server.pool import SynthesisPool
    from tts_server.serving import TtsService
    from tts_server.verbalize import Verbalizer
    from tts_server.voices import VoiceRegistry, load_voices

    def load() -> VoiceRegistry:
        voices = load_voices(
            settings.voices_dir,
            default=settings.tts_default_voice,
            onnx_threads=settings.tts_onnx_threads,
            espeak_fallback=settings.tts_espeak_fallback,
        )
        voices.warm_up()
        return voices

    verbalizer = Verbalizer() if settings.tts_normalize else None
    voices = await asyncio.to_thread(load)
    if verbalizer is not None:
        await asyncio.to_thread(verbalizer.warm_up)
    pool = SynthesisPool(settings.tts_workers)
    stack.callback(pool.close)
    # Admin keys open the TTS server too: the console's playground speaks with the operator's key.
    app.state.tts_api_keys = [*(settings.tts_api_key_list or api_keys), *settings.admin_api_key_list]
    app.state.tts = service = TtsService(settings, voices, pool, verbalizer)
    # The remote engines' connections (of the voices in use at shutdown).
    stack.push_async_callback(lambda: service.voices.aclose())
    swaps: set[asyncio.Task[None]] = set()
    stack.callback(lambda: [task.cancel() for task in swaps])

    async def swap() -> None:
        """New voices (and `voices.yaml`) for new streams; streams in flight keep the voices they
        started with. A set that does not load leaves the voices in use in place."""
        try:
            old, service.voices = service.voices, await asyncio.to_thread(load)
        except Exception as exc:  # any failure to load keeps the server speaking as before
            log.error("SIGHUP: voices not reloaded (%s); the voices in use stay", exc)
            return
        log.info("SIGHUP: voices reloaded: %s", ", ".join(info.name for info in service.voices.infos))
        # The old remote engines' connections, once the streams that started with them are over.
        await asyncio.sleep(_OLD_VOICES_KEPT_S)
        await old.aclose()

    def reload() -> None:
        task = asyncio.create_task(swap())
        swaps.add(task)
        task.add_done_callback(swaps.discard)

    reloaders.append(reload)
