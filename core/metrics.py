"""Prometheus metrics. With several worker processes, `trtc-backend serve` sets
`PROMETHEUS_MULTIPROC_DIR` so `/metrics` aggregates every worker."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

LLM_ROUNDS = Counter(
    "trtc_llm_rounds_total",
    "Chat rounds by outcome (completed, interrupted, replayed, failed, stateless).",
    ["outcome"],
)
LLM_UPSTREAM_ERRORS = Counter(
    "trtc_llm_upstream_errors_total", "Upstream failures by kind.", ["kind"]
)
LLM_FIRST_TOKEN = Histogram(
    "trtc_llm_first_token_seconds",
    "Request received to first upstream token, as the proxy saw it.",
    buckets=_LATENCY_BUCKETS,
)
MEMORY_SUMMARIES = Counter(
    "trtc_memory_summaries_total",
    "Memory writes by outcome: written (a task's summary), user_written (a user's memory), failed "
    "(retried with the task's next round or the next sweep).",
    ["outcome"],
)
LLM_FALLBACKS = Counter(
    "trtc_llm_fallbacks_total",
    "Rounds handed to a profile's next upstream before the first token, by profile and reason.",
    ["profile", "reason"],
)
LLM_ADDED = Histogram(
    "trtc_llm_added_seconds",
    "Time the proxy spent before calling the upstream (auth, parsing, history, ordering).",
    buckets=_LATENCY_BUCKETS,
)

LLM_FAST_REPLIES = Counter(
    "trtc_llm_fast_replies_total",
    "Fast replies (a profile's `fast_reply`) by profile and outcome: spoken, dropped (the main model spoke "
    "first), failed (the small model failed, hung, said nothing, too much or nothing speakable).",
    ["profile", "outcome"],
)
LLM_FAST_REPLY_TOKENS = Counter(
    "trtc_llm_fast_reply_tokens_total", "Completion tokens the fast-reply models wrote, by profile.", ["profile"]
)
KNOWLEDGE_SEARCHES = Counter(
    "trtc_knowledge_searches_total",
    "Knowledge searches of rounds, by how they went: found (passages given), none (nothing matched), "
    "skipped (small talk), tool (the model asked), failed (the round went on without).",
    ["outcome"],
)
KNOWLEDGE_LEXICAL_ONLY = Counter(
    "trtc_knowledge_lexical_only_total",
    "Searches that fell back to lexical ranking because the embedder failed or was slower than its timeout_ms.",
    ["model"],
)
HTTP_REFUSED = Counter(
    "trtc_http_refused_total",
    "Connections refused before any route ran, by reason (head_too_large, head_timeout, "
    "too_many_connections, malformed).",
    ["reason"],
)


TTS_STREAMS = Counter(
    "trtc_tts_streams_total",
    "TTS requests by outcome (completed, cached, empty, cancelled, busy, failed).",
    ["outcome"],
)
TTS_ENGINE_FALLBACKS = Counter(
    "trtc_tts_engine_fallbacks_total",
    "Pieces a remote voice's engine did not say (its fallback did, or the stream ended), by engine and reason.",
    ["engine", "reason"],
)
TTS_PIECES = Counter("trtc_tts_pieces_total", "Text pieces synthesized.")
TTS_FIRST_AUDIO = Histogram(
    "trtc_tts_first_audio_seconds",
    "TTS request received to its first audio ready to send.",
    buckets=_LATENCY_BUCKETS,
)


# The orchestrator's own measurements (callback events 906 and 908), named after its metrics,
# so a team sees `llm_first_token` as the orchestrator measured it beside the proxy's own.
ORCHESTRATOR_LATENCIES = {
    name: Histogram(
        f"trtc_orchestrator_{name}_seconds",
        f"The orchestrator's `{name}` (event 906), reported in ms.",
        buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
    )
    for name in ("asr_latency", "llm_network_latency", "llm_first_token", "tts_network_latency", "tts_first_frame_latency")
}
ORCHESTRATOR_COUNTS = {
    name: Counter(f"trtc_orchestrator_{name}_total", f"The orchestrator's `{name}` events (906).")
    for name in ("tts_discontinuity", "interruption")
}
ORCHESTRATOR_ERRORS = Counter(
    "trtc_orchestrator_errors_total", "The orchestrator's error metrics (908) by metric and code.", ["metric", "code"]
)
ORCHESTRATOR_EVENTS = Counter(
    "trtc_orchestrator_events_total", "Callback events stored (each once), by type.", ["event_type"]
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
