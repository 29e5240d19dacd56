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
LLM_ADDED = Histogram(
    "trtc_llm_added_seconds",
    "Time the proxy spent before calling the upstream (auth, parsing, history, ordering).",
    buckets=_LATENCY_BUCKETS,
)


TTS_STREAMS = Counter(
    "trtc_tts_streams_total",
    "TTS requests by outcome (completed, cached, empty, cancelled, busy, failed).",
    ["outcome"],
)
TTS_PIECES = Counter("trtc_tts_pieces_total", "Text pieces synthesized.")
TTS_FIRST_AUDIO = Histogram(
    "trtc_tts_first_audio_seconds",
    "TTS request received to its first audio ready to send.",
    buckets=_LATENCY_BUCKETS,
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
