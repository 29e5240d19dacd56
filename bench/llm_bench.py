"""Chat proxy benchmark: time to first token (TTFT) and total time through the proxy, side by side
with the same fake upstream called directly with the same messages, interleaved in one run.

Open-loop load, as conversations are: every conversation sends a round every `--interval`
seconds whether or not its last one finished; rounds alternate between the proxy and the direct
path. Each task starts with a 50-round history in the store; the direct path sends those 101
messages (system + 50 rounds) itself. Then a saturation search: the proxy rounds per second at
which the p99 added TTFT passes 50 ms. Then retention: the proxy restarted with `RETENTION_DAYS`
over a backlog of expired tasks, and the same level measured again while it purges them. Writes
its tables into docs/benchmarks.md.

    .venv/bin/python bench/llm_bench.py            # SQLite and PostgreSQL (make bench-llm)
    .venv/bin/python bench/llm_bench.py --quick    # short smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from sqlalchemy.engine import Connection, make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from admin.lifecycle import PURGE_BATCH, PURGE_TARGET_S  # noqa: E402
from llm_proxy.context import message_tokens  # noqa: E402
from llm_proxy.models import Message, Round, Task  # noqa: E402
from migrations import upgrade  # noqa: E402
from report import table, write_section  # noqa: E402
from loadgen import Client  # noqa: E402
from tests.support import (  # noqa: E402
    Proxy,
    ServerProcess,
    create_postgres_database,
    drop_postgres_database,
    postgres_execute,
    run_db,
)

KEY = "bench-key"
CHAT_PATH = "/v1/chat/completions"
HISTORY_ROUNDS = 50
SYSTEM = {"role": "system", "content": "You are a friendly voice assistant. Answer in one or two short sentences."}
REPLY_WORDS = 20
# The history window of the `memory-*` profiles.
MEMORY_WINDOW = 10


def _history(task_n: int) -> list[dict]:
    out = []
    for r in range(HISTORY_ROUNDS):
        out.append({"role": "user", "content": f"Question {r} from conversation {task_n}: what should I cook tonight?"})
        out.append({"role": "assistant", "content": "Try a quick vegetable stir fry with rice, garlic and a little soy sauce; it takes twenty minutes."})
    return out


def _seed(url: str, task_ids: list[str], rounds_each: int = HISTORY_ROUNDS, age_days: float = 0) -> None:
    now = datetime.now(timezone.utc) - timedelta(days=age_days)
    rounds, messages = [], []
    for n, task_id in enumerate(task_ids):
        history = _history(n)
        for r in range(rounds_each):
            round_id = uuid.uuid4().hex
            pair = history[2 * r: 2 * r + 2]
            rounds.append({"id": round_id, "task_id": task_id, "seq": r + 1, "status": "completed",
                           "interrupted": False, "tokens": sum(message_tokens(m) for m in pair),
                           "created_at": now, "finished_at": now})
            for position, m in enumerate(pair):
                messages.append({"round_id": round_id, "position": position, "role": m["role"],
                                 "content": m["content"], "tokens": message_tokens(m)})

    def insert(conn: Connection) -> None:
        conn.execute(Task.__table__.insert(), [
            {"id": t, "last_seq": rounds_each, "created_at": now, "updated_at": now} for t in task_ids
        ])
        conn.execute(Round.__table__.insert(), rounds)
        conn.execute(Message.__table__.insert(), messages)

    run_db(url, insert)


def _profiles_file(profile: str) -> str:
    """The one profile of `--profile`: the output filters off or on (what a profile and the
    filters cost, beside the implicit profile, which strips reasoning only); or a window of
    MEMORY_WINDOW rounds over the 50 stored with memory off or on: the rolling summary and
    per-user memory (every round then has rounds outside its window: a batch of them is folded
    every MEMORY_WINDOW rounds, by the same upstream, in the background while the level runs;
    each task's first round copies its user's memory)."""
    flag = "true" if profile.endswith("-on") else "false"
    if profile.startswith("filters"):
        settings = f"    output: {{strip_reasoning: {flag}, speakable: {flag}}}\n"
    else:
        settings = (f"    history: {{max_rounds: {MEMORY_WINDOW}}}\n"
                    f"    memory: {{summary: {flag}, per_user: {flag}, user_id: header.X-User-Id}}\n")
    return "profiles:\n  - name: bench\n    default: true\n" + settings


class FastUpstream(ServerProcess):
    """`bench/fast_upstream.py` in its own process."""

    def start(self) -> None:
        script = str(ROOT / "bench" / "fast_upstream.py")
        self._spawn([sys.executable, script, "--port", str(self.port)], {}, self.log_path.parent)
        self._wait_ready("/v1/models")


def _cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its descendants (uvicorn's workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _cpu_s(int(child))
    return total


@dataclass
class Samples:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: int = 0


async def _round(client: Client, body: dict, headers: dict, samples: Samples) -> None:
    started = time.perf_counter()
    try:
        outcome = await client.post(CHAT_PATH, body, headers)
    except OSError:
        samples.errors += 1
        return
    if outcome.status != 200 or outcome.first is None or outcome.done is None:
        samples.errors += 1
        return
    samples.ttft.append(outcome.first - started)
    samples.total.append(outcome.done - started)


async def run_level(proxy_url: str, upstream_url: str, task_ids: list[str], conversations: int,
                    interval: float, duration: float) -> tuple[Samples, Samples, float]:
    """`conversations` open-loop conversations for `duration` s; returns proxy, direct, proxy rounds/s."""
    proxy, direct = Samples(), Samples()
    pc, dc = Client(proxy_url), Client(upstream_url)
    try:
        in_flight: set[asyncio.Task] = set()
        rng = random.Random(conversations)

        async def conversation(n: int) -> None:
            task_id = task_ids[n]
            history = _history(n)
            await asyncio.sleep(rng.uniform(0, interval))
            start = time.perf_counter()
            k = 0
            while time.perf_counter() - start < duration:
                user = {"role": "user", "content": f"[[words:{REPLY_WORDS}]] round {k} of {task_id}"}
                if k % 2 == 0:
                    body = {"model": "fake", "stream": True, "messages": [SYSTEM, user]}
                    headers = {"Authorization": f"Bearer {KEY}", "X-Task-Id": task_id, "X-Request-Id": uuid.uuid4().hex,
                               "X-Sdk-App-Id": "1400000000", "X-User-Id": f"user-{n}"}
                    job = _round(pc, body, headers, proxy)
                else:
                    body = {"model": "fake", "stream": True, "messages": [SYSTEM, *history, user]}
                    job = _round(dc, body, {}, direct)
                t = asyncio.ensure_future(job)
                in_flight.add(t)
                t.add_done_callback(in_flight.discard)
                k += 1
                await asyncio.sleep(max(0.0, start + k * interval - time.perf_counter()))

        began = time.perf_counter()
        await asyncio.gather(*(conversation(n) for n in range(conversations)))
        if in_flight:
            await asyncio.gather(*in_flight)
        elapsed = time.perf_counter() - began
    finally:
        pc.close()
        dc.close()
    return proxy, direct, len(proxy.ttft) / elapsed


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}"


@dataclass
class Row:
    db: str
    workers: int
    conversations: int
    proxy: Samples
    direct: Samples
    rate: float
    cpu: dict[str, float]  # CPU seconds per round (proxy or direct) of each process

    def cells(self) -> list[str]:
        p, d = self.proxy, self.direct
        return [
            self.db, str(self.workers), str(self.conversations), f"{self.rate:.1f}", str(len(p.ttft)),
            _ms(statistics.median(d.ttft)), _ms(statistics.median(p.ttft)),
            _ms(statistics.median(p.ttft) - statistics.median(d.ttft)),
            _ms(_p(d.ttft, 0.99)), _ms(_p(p.ttft, 0.99)), _ms(_p(p.ttft, 0.99) - _p(d.ttft, 0.99)),
            f"{statistics.median(p.ttft) / statistics.median(d.ttft):.2f}",
            _ms(statistics.median(d.total)), _ms(statistics.median(p.total)),
            _ms(_p(d.total, 0.99)), _ms(_p(p.total, 0.99)),
            _ms(2 * self.cpu["proxy"]), _ms(self.cpu["upstream"]), _ms(self.cpu["loadgen"]),
            str(p.errors + d.errors),
        ]


HEADER = ["db", "workers", "conversations", "proxy rounds/s", "proxy rounds", "TTFT direct median", "TTFT proxy median",
          "added median", "TTFT direct p99", "TTFT proxy p99", "added p99", "TTFT ratio",
          "total direct median", "total proxy median", "total direct p99", "total proxy p99",
          "CPU proxy / proxy round", "CPU upstream / round", "CPU load generator / round", "errors"]


RETENTION_INTERVAL_S = 5
RETENTION_HEADER = ["db", "workers", "conversations", "expired tasks purged during the level", "purged tasks/s",
                    "TTFT proxy median, no purge", "TTFT proxy median, purging", "TTFT proxy p99, no purge",
                    "TTFT proxy p99, purging", "total proxy p99, no purge", "total proxy p99, purging", "errors"]


def _count_tasks(prefix: str) -> Callable[[Connection], int]:
    def count(conn: Connection) -> int:
        from sqlalchemy import func, select

        return conn.execute(select(func.count()).where(Task.id.like(f"{prefix}%"))).scalar_one()

    return count


def bench_db(
    db: str, url: str, workers: int, args: argparse.Namespace, workdir: Path
) -> tuple[list[Row], list[list[str]], list[list[str]]]:
    upgrade(url)
    max_conv = max([*args.levels, *args.saturation])
    task_ids = [f"bench-{uuid.uuid4().hex[:8]}-{n}" for n in range(max_conv)]
    _seed(url, task_ids)
    if db == "postgres":
        # Settle the bulk insert now rather than in autovacuum's time during a measured run.
        asyncio.run(postgres_execute(url, "VACUUM ANALYZE"))
    fake = FastUpstream(workdir / "upstream.log")
    fake.start()
    env = {"DATABASE_URL": url, "UPSTREAM_BASE_URL": fake.url + "/v1", "API_KEYS": KEY, "LOG_LEVEL": "WARNING",
           "HISTORY_MAX_ROUNDS": str(HISTORY_ROUNDS), "HISTORY_MAX_TOKENS": "100000"}
    if args.retention_backlog:
        # Retention on from the start, as in production: every level runs with its periodic
        # (and, until the backlog is seeded, empty) purges.
        env.update({"RETENTION_DAYS": "7", "RETENTION_INTERVAL_S": str(RETENTION_INTERVAL_S)})
    if args.profile != "implicit":
        config = workdir / "profiles.yaml"
        config.write_text(_profiles_file(args.profile))
        env["CONFIG_FILE"] = str(config)
    proxy = Proxy(workdir, env)
    proxy.start("--workers", str(workers), "--only", "llm")
    rows: list[Row] = []
    saturation: list[list[str]] = []
    retention: list[list[str]] = []
    try:
        def cpu_s() -> dict[str, float]:
            return {"proxy": _cpu_s(proxy.pid), "upstream": _cpu_s(fake.pid), "loadgen": time.process_time()}

        def level(n: int, interval: float, duration: float) -> tuple[Samples, Samples, float, dict[str, float]]:
            before = cpu_s()
            p, d, rate = asyncio.run(run_level(proxy.url, fake.url, task_ids, n, interval, duration))
            rounds = max(1, len(p.ttft) + len(d.ttft))
            cpu = {name: (used - before[name]) / rounds for name, used in cpu_s().items()}
            return p, d, rate, cpu

        # Warm-up: one unmeasured proxy round for every task, as in a running deployment, where a
        # conversation's history was read when it started, not at the moment it is measured.
        level(4, 0.2, 2)
        level(len(task_ids), args.interval, args.interval)
        for n in args.levels:
            p, d, rate, cpu = level(n, args.interval, args.duration * (2 if n == 1 else 1))
            rows.append(Row(db if args.profile == "implicit" else f"{db}, {args.profile}", workers, n, p, d, rate, cpu))
            print(table(HEADER, [rows[-1].cells()]).splitlines()[-1], flush=True)
        for n in args.saturation:
            p, d, rate, _cpu = level(n, args.interval, args.duration)
            added_p99 = _p(p.ttft, 0.99) - _p(d.ttft, 0.99)
            saturation.append([db, str(workers), str(n), f"{rate:.1f}", _ms(_p(d.ttft, 0.99)), _ms(_p(p.ttft, 0.99)),
                               _ms(added_p99), str(p.errors + d.errors), "yes" if added_p99 > 0.050 else "no"])
            print(saturation[-1], flush=True)
            if added_p99 > 0.050:
                break
        if args.retention_backlog:
            retention.append(purging_level(url, rows, level, args))
    finally:
        proxy.stop()
        fake.stop()
    return rows, saturation, retention


def purging_level(url: str, rows: list[Row], level: Callable, args: argparse.Namespace) -> list[str]:
    """A backlog of expired tasks (10 rounds each) added under the running proxy; once its
    retention has started on them, the last level is measured again while the purge goes on."""
    base = rows[-1]
    prefix = f"expired-{uuid.uuid4().hex[:6]}-"
    _seed(url, [f"{prefix}{n}" for n in range(args.retention_backlog)], rounds_each=10, age_days=30)
    deadline = time.monotonic() + 3 * RETENTION_INTERVAL_S
    while (before := run_db(url, _count_tasks(prefix))) == args.retention_backlog and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for the next periodic purge to begin
    started = time.perf_counter()
    p, d, _rate, _cpu = level(base.conversations, args.interval, args.duration)
    elapsed = time.perf_counter() - started
    after = run_db(url, _count_tasks(prefix))
    if after == 0:
        print(f"warning: the purge finished within the level ({before} tasks); raise --retention-backlog", flush=True)
    purged = before - after
    if purged == 0:
        raise SystemExit(f"retention purged nothing while the level ran ({before} expired tasks left)")
    bp = base.proxy
    cells = [base.db, str(base.workers), str(base.conversations), str(purged), f"{purged / elapsed:.0f}",
             _ms(statistics.median(bp.ttft)), _ms(statistics.median(p.ttft)), _ms(_p(bp.ttft, 0.99)), _ms(_p(p.ttft, 0.99)),
             _ms(_p(bp.total, 0.99)), _ms(_p(p.total, 0.99)), str(p.errors + d.errors)]
    print(cells, flush=True)
    return cells


def _postgres_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    """A fresh database for one run, and how to drop it."""
    name = f"trtc_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(create_postgres_database(admin_url, name))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, lambda: asyncio.run(drop_postgres_database(admin_url, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--postgres-url", default=os.environ.get("TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--saturation", type=int, nargs="*", default=[300, 400, 500, 600, 700, 800])
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--profile", choices=["implicit", "filters-off", "filters-on", "memory-off", "memory-on"],
                        default="implicit",
                        help="the proxy's profile: none (the implicit one), or one from a file with the output filters "
                        "off or on, or with a 10-round window and the rolling summary off or on")
    parser.add_argument("--retention-backlog", type=int, default=20_000,
                        help="expired tasks (10 rounds each) purged while the last level runs again; 0: skip")
    parser.add_argument("--quick", action="store_true", help="short run: level 50 for 3 s, a small retention backlog")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.quick:  # one cell per table
        args.levels, args.saturation, args.duration = [50], [], 3.0
        args.retention_backlog = min(args.retention_backlog, 500)

    all_rows: list[Row] = []
    all_saturation: list[list[str]] = []
    all_retention: list[list[str]] = []
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    for db in dbs:
        for workers in args.workers:
            with tempfile.TemporaryDirectory(prefix=f"trtc-bench-{db}-") as tmp:
                workdir = Path(tmp)
                if db == "sqlite":
                    rows, sat, ret = bench_db(db, f"sqlite:///{workdir / 'bench.db'}", workers, args, workdir)
                else:
                    url, drop = _postgres_database(args.postgres_url)
                    try:
                        rows, sat, ret = bench_db(db, url, workers, args, workdir)
                    finally:
                        drop()
                all_rows += rows
                all_saturation += sat
                all_retention += ret

    command = "python bench/llm_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = "\n".join([
        "## Chat proxy (`bench/llm_bench.py`)",
        "",
        f"Command: `{command.strip()}` (via `make bench-llm`), {datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{os.cpu_count()} cores; the fake upstream (`bench/fast_upstream.py`), the proxy (1 or 2 worker "
        "processes) and the load generator (`bench/loadgen.py`) share the machine. Times in ms. Each "
        f"conversation sends a round every {args.interval:g} s (open loop), alternating proxy and direct; each "
        f"task holds a {HISTORY_ROUNDS}-round history in the store, which the direct path sends itself (101 "
        "messages + the new one); every task has had one unmeasured proxy round before the measured ones. "
        f"Reply: {REPLY_WORDS} streamed words. \"added\" = proxy minus direct. CPU columns: milliseconds of "
        "CPU per round, the proxy's per proxied round (all its workers), the others' per request.",
        "",
        table(HEADER, [r.cells() for r in all_rows]),
        "",
        "Saturation search (same load shape, more conversations): the first row whose added p99 TTFT passes 50 ms "
        "marks saturation; the row before it is the highest sustained rate.",
        "",
        table(["db", "workers", "conversations", "proxy rounds/s", "TTFT direct p99", "TTFT proxy p99", "added p99", "errors", "past 50 ms"],
               all_saturation) if all_saturation else "(not run)",
        "",
        f"Retention: the proxy runs with `RETENTION_DAYS=7` and `RETENTION_INTERVAL_S={RETENTION_INTERVAL_S}` "
        "throughout (the rows above include its empty periodic purges). Then a backlog of expired tasks "
        "(10 rounds each, 30 days old) is added, and once the purge has begun on it the last level above is "
        f"measured again while it deletes them (transactions of {PURGE_BATCH} tasks to start, scaled so each takes about {PURGE_TARGET_S * 1000:g} ms); \"no purge\" is that level's row above.",
        "",
        table(RETENTION_HEADER, all_retention) if all_retention else "(not run)",
    ])
    print(section)
    if not args.no_write:
        write_section("llm-bench", section)


if __name__ == "__main__":
    main()
