"""Remote voices: first audio and total time of a sentence through this TTS server fronting a
remote engine, side by side with calling the same engine directly (the same text, in one run),
at concurrency 1 and 8; and how long a hanging engine keeps a caller waiting before the fallback
voice speaks.

Engines, each a server in its own process: a scripted fake engine (the fake upstream's
`/v1/audio/speech`: a sine, its first bytes after `--engine-ms`) and this project's own speech
API (`serve --only tts`, the bundled piper voice). Writes its table into docs/benchmarks.md.

    .venv/bin/python bench/remote_voice_bench.py            # 40 requests per cell
    .venv/bin/python bench/remote_voice_bench.py --quick    # short smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report import table, write_section  # noqa: E402
from tests.support import Proxy, Upstream  # noqa: E402

KEY = "bench-tts-key"
TEXT = "Thanks for waiting. Your order shipped this morning and should arrive on Thursday."
TIMEOUT_MS = 500


async def _timed(http: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    async with http.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url}: HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for part in response.aiter_bytes():
            if part and first is None:
                first = time.perf_counter() - started
    assert first is not None
    return first, time.perf_counter() - started


# Each request its own words: neither this server's response cache nor the engine's answers any.
_serial = iter(range(1_000_000))


def _unique(body: dict) -> dict:
    n = next(_serial)
    if "input" in body:
        return {**body, "input": f"Reference {n}. {body['input']}"}
    return {**body, "Text": f"Reference {n}. {body['Text']}"}


async def _cell(url: str, body: dict, headers: dict, requests: int, concurrency: int) -> tuple[list[float], list[float]]:
    firsts: list[float] = []
    totals: list[float] = []
    left = list(range(requests))
    async with httpx.AsyncClient(timeout=60) as http:
        async def worker() -> None:
            while left:
                left.pop()
                first, total = await _timed(http, url, _unique(body), headers)
                firsts.append(first)
                totals.append(total)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return firsts, totals


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}"


def _p95(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="requests per cell")
    parser.add_argument("--engine-ms", type=int, default=150, help="the fake engine's time to its first bytes")
    parser.add_argument("--quick", action="store_true", help="4 requests per cell")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.quick:
        args.requests = 4
    workdir = Path(tempfile.mkdtemp(prefix="remote-voice-bench-"))
    fake = Upstream(workdir / "upstream.log", record=False)
    fake.start()
    engine = Proxy(workdir / "engine", {"TTS_API_KEYS": KEY, "LOG_LEVEL": "WARNING", "TTS_WORKERS": "2"})
    engine.start("--only", "tts")
    voices = workdir / "voices"
    voices.mkdir()
    delay = args.engine_ms / 1000
    (voices / "voices.yaml").write_text(
        "voices:\n"
        f"  fake: {{engine: openai-speech, base_url: '{fake.base_url}', model: 'e[[first_delay:{delay}]]', max_concurrency: 8}}\n"
        f"  ours: {{engine: openai-speech, base_url: '{engine.url}/v1', api_key: {KEY}, model: tts-1, "
        "voice: en_US-joe-medium, max_concurrency: 8}\n"
        f"  hanging: {{engine: openai-speech, base_url: '{fake.base_url}', model: 'e[[first_delay:30]]', "
        f"timeout_ms: {TIMEOUT_MS}, fallback: en_US-joe-medium}}\n"
    )
    server = Proxy(workdir / "server", {"TTS_API_KEYS": KEY, "VOICES_DIR": str(voices), "LOG_LEVEL": "WARNING"})
    server.start("--only", "tts")
    auth = {"Authorization": f"Bearer {KEY}"}
    rows = []
    try:
        for name, direct_url, model, voice in (
            (f"fake engine ({args.engine_ms} ms to first bytes)", fake.base_url + "/audio/speech",
             f"e[[first_delay:{delay}]]", "alloy"),
            ("this project's speech API (piper)", engine.url + "/v1/audio/speech", "tts-1", "en_US-joe-medium"),
        ):
            proxied_voice = "fake" if name.startswith("fake") else "ours"
            direct_body = {"model": model, "input": TEXT, "voice": voice, "response_format": "pcm"}
            ours_body = {"Text": TEXT, "AudioFormat": "pcm", "SampleRate": 24000}
            for concurrency in (1, 8):
                asyncio.run(_cell(direct_url, direct_body, auth, 2, 1))  # warm-up
                direct = asyncio.run(_cell(direct_url, direct_body, auth, args.requests, concurrency))
                proxied = asyncio.run(_cell(f"{server.url}/api/v1/tts/stream?voice={proxied_voice}", ours_body,
                                            {**auth, "X-Task-Id": "bench"}, args.requests, concurrency))
                rows.append([name, str(concurrency), str(args.requests),
                             _ms(direct[0]), _p95(direct[0]), _ms(proxied[0]), _p95(proxied[0]),
                             _ms(direct[1]), _ms(proxied[1])])
        # The first request waits `timeout_ms` for the engine; the next ones, within the engine's
        # retry pause (`remote.RETRY_AFTER_S`), go to the fallback at once.
        hang_body = {"Text": TEXT, "AudioFormat": "pcm", "SampleRate": 24000}
        hanging = asyncio.run(_cell(f"{server.url}/api/v1/tts/stream?voice=hanging", hang_body,
                                    {**auth, "X-Task-Id": "bench"}, 1, 1))
        paused = asyncio.run(_cell(f"{server.url}/api/v1/tts/stream?voice=hanging", hang_body,
                                   {**auth, "X-Task-Id": "bench"}, max(2, args.requests // 4), 1))
    finally:
        server.stop()
        engine.stop()
        fake.stop()
    command = "python bench/remote_voice_bench.py " + shlex.join(sys.argv[1:])
    body = (
        f"A {len(TEXT)}-character sentence (and a reference number first, new in every request, so no cache answers) as 24 kHz `pcm`, through this TTS server fronting a remote "
        "engine (`/api/v1/tts/stream?voice=...`) and from the same engine directly (OpenAI's `/v1/audio/speech`, "
        "the whole text in one request), in one run; ms, median (p95).\n\n"
        + table(["engine", "concurrency", "requests", "direct first audio", "direct p95", "through this server",
                 "through p95", "direct total", "through total"], rows)
        + f"\n\nA hanging engine (`timeout_ms: {TIMEOUT_MS}`, the bundled piper voice as fallback): first audio after "
        f"{_ms(hanging[0])} ms, whole sentence after {_ms(hanging[1])} ms; the requests that follow within the engine's "
        f"retry pause go to the fallback at once: first audio after {_ms(paused[0])} ms (p95 {_p95(paused[0])}), "
        f"{len(paused[0])} requests.\n\nCommand: `{command.strip()}`"
    )
    print(body)
    if not args.no_write:
        write_section("remote-voices", "### Remote voices (issue 31)\n\n" + body)


if __name__ == "__main__":
    main()
