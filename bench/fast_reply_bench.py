"""Fast replies: time to the first text a caller hears, and to the main model's first text, with
and without a profile's `fast_reply`, side by side in one run (rounds interleaved).

The fake upstream plays both models: a main one whose first token takes `--main-ms` (1.5 s by
default; a second pair of profiles has a quick one, 100 ms, whose rounds should lose nothing)
and a small one that says its line after `--small-ms` (150 ms). One `serve --only llm` process
(SQLite). Also the small model's completion tokens per round (from /metrics). Writes its table
into docs/benchmarks.md.

    .venv/bin/python bench/fast_reply_bench.py            # 200 rounds per profile
    .venv/bin/python bench/fast_reply_bench.py --quick    # short smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report import table, write_section  # noqa: E402
from tests.support import API_KEY, Proxy, Upstream  # noqa: E402

LINE = "Sure, let me check."
AFTER_MS = 600


def _profiles(url: str, main_ms: int, small_ms: int) -> str:
    small = f"small[[reply:{LINE}]][[first_delay:{small_ms / 1000}]]"
    out = "profiles:\n"
    for name, delay in (("slow", main_ms), ("quick", 100)):
        main = f"main[[first_delay:{delay / 1000}]][[words:20]]"
        out += (f"  - {{name: {name}-with, models: [{name}-with], tools: [], upstream: {{base_url: '{url}', model: '{main}'}},\n"
                f"     fast_reply: {{upstream: {{base_url: '{url}', model: '{small}'}}, after_ms: {AFTER_MS}}}}}\n"
                f"  - {{name: {name}-without, models: [{name}-without], tools: [], upstream: {{base_url: '{url}', model: '{main}'}}}}\n")
    return out


async def _round(http: httpx.AsyncClient, model: str, n: int) -> tuple[float, float]:
    """(time to the first text, time to the main model's first text) of one streamed round."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": f"question {n}: what is new?"}]}
    head = {"Authorization": f"Bearer {API_KEY}", "X-Task-Id": f"fast-{model}-{n}", "X-Request-Id": uuid.uuid4().hex}
    started = time.perf_counter()
    first = main = None
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=head) as response:
        if response.status_code != 200:
            raise SystemExit(f"{model}: HTTP {response.status_code}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            text = choices[0].get("delta", {}).get("content")
            if not text:
                continue
            now = time.perf_counter() - started
            first = now if first is None else first
            if main is None and text.strip() != LINE:
                main = now
    if first is None or main is None:
        raise SystemExit(f"{model}: no text")
    return first, main


async def _run(url: str, rounds: int, concurrency: int) -> dict[str, list[tuple[float, float]]]:
    jobs = [(model, n) for n in range(rounds) for model in ("slow-with", "slow-without", "quick-with", "quick-without")]
    random.Random(5).shuffle(jobs)
    results: dict[str, list[tuple[float, float]]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async def worker() -> None:
            while jobs:
                model, n = jobs.pop()
                results.setdefault(model, []).append(await _round(http, model, n))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200, help="rounds per profile")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--main-ms", type=int, default=1500)
    parser.add_argument("--small-ms", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="8 rounds per profile")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.concurrency = 8, 4
    workdir = Path(tempfile.mkdtemp(prefix="fast-reply-bench-"))
    fake = Upstream(workdir / "upstream.log", record=False)
    fake.start()
    config = workdir / "profiles.yaml"
    config.write_text(_profiles(fake.base_url, args.main_ms, args.small_ms))
    proxy = Proxy(workdir / "proxy", {"API_KEYS": API_KEY, "LOG_LEVEL": "WARNING", "CONFIG_FILE": str(config)})
    from migrations import upgrade

    upgrade(proxy.database_url)
    try:
        proxy.start("--only", "llm")
        asyncio.run(_run(proxy.url, 2, 4))  # warm-up
        results = asyncio.run(_run(proxy.url, args.rounds, args.concurrency))
        metrics = httpx.get(proxy.url + "/metrics").text
    finally:
        proxy.stop()
        fake.stop()

    def count(name: str, **labels: str) -> float:
        selector = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        found = re.search(rf"{name}{{{selector}}} ([0-9.e+]+)", metrics)
        return float(found.group(1)) if found else 0.0

    rows = []
    for name, main_ms in (("slow", args.main_ms), ("quick", 100)):
        for variant in ("without", "with"):
            model = f"{name}-{variant}"
            first = [f for f, _ in results[model]]
            main_first = [m for _, m in results[model]]
            spoken = count("trtc_llm_fast_replies_total", profile=model, outcome="spoken")
            tokens = count("trtc_llm_fast_reply_tokens_total", profile=model)
            total = len(results[model]) + 2  # with the warm-up's
            rows.append([
                f"main model {main_ms} ms, fast_reply {'on' if variant == 'with' else 'off'}", str(len(first)),
                _ms(statistics.median(first)), _ms(_p(first, 0.95)),
                _ms(statistics.median(main_first)), _ms(_p(main_first, 0.95)),
                f"{spoken:.0f} of {total}" if variant == "with" else "-",
                f"{tokens / total:.1f}" if variant == "with" else "-",
            ])
    command = "python bench/fast_reply_bench.py " + shlex.join(sys.argv[1:])
    body = (
        f"A fake main model whose first token takes {args.main_ms} ms (and a quick one, 100 ms), a small model that says "
        f"its line after {args.small_ms} ms, `after_ms: {AFTER_MS}`; one `serve --only llm` process, {args.concurrency} rounds "
        "at once, the four profiles' rounds interleaved in one run; ms. 'First text' is the first text the caller "
        "receives (the line, when spoken); 'main first text' the main model's (target for the first: "
        f"{AFTER_MS} + 30 ms at p95 with a slow model; for the second: no difference beyond noise).\n\n"
        + table(["rounds of", "rounds", "first text p50", "first text p95", "main first text p50", "main first text p95",
                 "lines spoken", "small-model tokens per round"], rows)
        + f"\n\nCommand: `{command.strip()}`"
    )
    print(body)
    if not args.no_write:
        write_section("fast-reply", "### Fast replies (issue 30)\n\n" + body)


if __name__ == "__main__":
    main()
