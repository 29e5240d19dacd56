"""SQLite's WAL under sustained load: the `make run` setup (SQLite, one process) taking rounds back to
back from `--concurrency` clients, the WAL file's size sampled every 0.2 s. Side by side in one run:
the bound off (`SQLITE_WAL_MAX_MB=0`: passive checkpoints only, the baseline, under which the WAL
only grows) and on (the default 64 MB), with the rounds' TTFT and total time, so what the
checkpoints that empty the WAL cost is measured too. Writes its table into docs/benchmarks.md.

    .venv/bin/python bench/wal_bench.py                 # 10,000 rounds at concurrency 16, each setting
    .venv/bin/python bench/wal_bench.py --quick --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_bench import FastUpstream  # noqa: E402
from loadgen import Client  # noqa: E402
from report import table, write_section  # noqa: E402
from tests.support import API_KEY, Proxy  # noqa: E402

CHAT = "/v1/chat/completions"
# Rounds per task: a task's history grows as a real one does, then a new task starts.
ROUNDS_PER_TASK = 20


async def _load(url: str, rounds: int, concurrency: int, wal: Path, samples: list[int]) -> tuple[list[float], list[float], int]:
    client = Client(url)
    ttft: list[float] = []
    total: list[float] = []
    errors = 0
    next_round = 0

    async def worker() -> None:
        nonlocal next_round, errors
        while next_round < rounds:
            n = next_round
            next_round += 1
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": f"round {n}: what is the weather like?"}]}
            headers = {"authorization": f"Bearer {API_KEY}", "x-task-id": f"wal-task-{n // ROUNDS_PER_TASK}",
                       "x-request-id": uuid.uuid4().hex}
            started = time.perf_counter()
            try:
                outcome = await client.post(CHAT, body, headers)
            except OSError:
                errors += 1
                continue
            if outcome.status != 200 or outcome.first is None or outcome.done is None:
                errors += 1
                continue
            ttft.append(outcome.first - started)
            total.append(outcome.done - started)

    async def sample() -> None:
        while True:
            samples.append(wal.stat().st_size if wal.exists() else 0)
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        sampler.cancel()
        client.close()
    samples.append(wal.stat().st_size if wal.exists() else 0)
    return ttft, total, errors


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _mb(size: float) -> str:
    return f"{size / 1024 / 1024:.1f}"


def run(bound_mb: int, args: argparse.Namespace, workdir: Path, upstream_url: str) -> list[str]:
    data = workdir / f"bound-{bound_mb}"
    proxy = Proxy(data, {"UPSTREAM_BASE_URL": upstream_url, "API_KEYS": API_KEY, "LOG_LEVEL": "WARNING",
                         "SQLITE_WAL_MAX_MB": str(bound_mb)})
    from migrations import upgrade

    upgrade(proxy.database_url)
    proxy.start("--only", "llm")
    db_file = Path(proxy.database_url.removeprefix("sqlite:///"))
    samples: list[int] = []
    try:
        started = time.perf_counter()
        ttft, total, errors = asyncio.run(_load(proxy.url, args.rounds, args.concurrency, Path(f"{db_file}-wal"), samples))
        elapsed = time.perf_counter() - started
    finally:
        proxy.stop()
    label = "off (baseline: passive checkpoints only)" if bound_mb == 0 else f"{bound_mb} MB"
    ms = lambda x: f"{x * 1000:.1f}"  # noqa: E731
    return [label, str(len(ttft)), str(errors), f"{len(ttft) / elapsed:.0f}", _mb(max(samples)), _mb(samples[-1]),
            _mb(db_file.stat().st_size), ms(statistics.median(ttft)), ms(_p(ttft, 0.99)), ms(_p(total, 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bound", type=int, default=64, help="SQLITE_WAL_MAX_MB of the bounded run")
    parser.add_argument("--quick", action="store_true", help="100 rounds at concurrency 4, a 1 MB bound")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.concurrency, args.bound = 100, 4, 1
    workdir = Path(tempfile.mkdtemp(prefix="wal-bench-"))
    fake = FastUpstream(workdir / "upstream.log")
    fake.start()
    try:
        rows = [run(bound, args, workdir, fake.url + "/v1") for bound in (0, args.bound)]
    finally:
        fake.stop()
    header = ["WAL bound", "rounds", "errors", "rounds/s", "largest WAL (MB)", "WAL at the end (MB)", "database (MB)",
              "median TTFT", "p99 TTFT", "p99 total"]
    command = "python bench/wal_bench.py " + shlex.join(sys.argv[1:])
    body = (
        f"SQLite's WAL under rounds sent back to back ({args.rounds} rounds per setting, {args.concurrency} at once, "
        f"{ROUNDS_PER_TASK} rounds per task), the `make run` setup (one process) with the fake upstream on "
        f"{os.cpu_count()} cores; WAL size sampled every 0.2 s; times in ms.\n\n"
        + table(header, rows) + f"\n\nCommand: `{command.strip()}`"
    )
    print(body)
    if not args.no_write:
        write_section("wal", "### SQLite's WAL under sustained load (issue 28)\n\n" + body)


if __name__ == "__main__":
    main()
