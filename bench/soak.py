"""Soak run: nothing is lost under faults. 50 open-loop conversations against the chat proxy
(the fake upstream behind it), with random client disconnects, retries with the same request id,
upstream errors before and during the stream, and a `kill -9` + restart of the server every few
minutes (the clients retry what the crash cut, as the orchestrator does). Then an audit reads the
database and checks every round against what its client saw:

- a round the client saw complete is stored exactly once, completed, with the text received;
- a round the client cut, or whose stream failed, is stored interrupted, its reply a prefix the
  client's text starts with (a crash leaves the user's words and an empty reply);
- an upstream refusal before the first token stores nothing;
- no round is left pending; each task's rounds are in the order they were sent.

The server's RSS is sampled every few seconds: it must stay flat within each life of the server.
Writes its table into docs/benchmarks.md.

    .venv/bin/python bench/soak.py                 # 10 minutes on SQLite (make bench-soak)
    .venv/bin/python bench/soak.py --minutes 3 --db postgres
    .venv/bin/python bench/soak.py --quick --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.engine import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_proxy.models import Message, Round  # noqa: E402
from migrations import upgrade  # noqa: E402
from report import table, write_section  # noqa: E402
from tests.support import API_KEY, Proxy, Upstream, create_postgres_database, drop_postgres_database, run_db  # noqa: E402

CHAT = "/v1/chat/completions"
LONG = "[[words:120]] [[delay:0.01]]"  # ~1.2 s of streaming: room to be cut
SHORT = "[[words:12]] [[delay:0.005]]"


@dataclass
class Attempt:
    """One HTTP attempt as its client saw it."""

    outcome: str  # completed | cut (client left) | failed (error event) | refused (5xx) | down
    text: str = ""


@dataclass
class Sent:
    task: str
    index: int  # the round's place in its conversation
    request_id: str
    kind: str
    attempts: list[Attempt] = field(default_factory=list)


class Soak:
    def __init__(self, proxy: Proxy, conversations: int, interval: float, seconds: float) -> None:
        self.proxy = proxy
        self.conversations = conversations
        self.interval = interval
        self.deadline = time.monotonic() + seconds
        self.sent: list[Sent] = []
        self.kills = 0
        self.rss: list[tuple[float, int, float]] = []  # (seconds since start, life, MB)
        self.started = time.monotonic()
        self.life = 1
        self.up = asyncio.Event()
        self.up.set()

    async def attempt(self, client: httpx.AsyncClient, sent: Sent, content: str, cut_after: int | None) -> Attempt:
        body = {"model": "m", "stream": True, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]}
        headers = {"Authorization": f"Bearer {API_KEY}", "X-Task-Id": sent.task, "X-Request-Id": sent.request_id}
        text: list[str] = []
        try:
            async with client.stream("POST", self.proxy.url + CHAT, json=body, headers=headers) as response:
                if response.status_code >= 500:
                    await response.aread()
                    return Attempt("refused")
                if response.status_code != 200:
                    raise AssertionError(f"{response.status_code}: {(await response.aread())[:300]!r}")
                chunks = 0
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:]
                    if payload == "[DONE]":
                        return Attempt("completed", "".join(text))
                    event = json.loads(payload)
                    if "error" in event:
                        return Attempt("failed", "".join(text))
                    for choice in event.get("choices", []):
                        if choice["delta"].get("content"):
                            text.append(choice["delta"]["content"])
                            chunks += 1
                    if cut_after is not None and chunks >= cut_after:
                        return Attempt("cut", "".join(text))
                return Attempt("down", "".join(text))  # the stream ended without [DONE]: the server died
        except (httpx.TransportError, httpx.RemoteProtocolError):
            return Attempt("down", "".join(text))

    async def conversation(self, client: httpx.AsyncClient, n: int) -> None:
        task = f"soak-{uuid.uuid4().hex[:10]}-{n}"
        rng = random.Random(n)
        index = 0
        next_at = time.monotonic() + rng.uniform(0, self.interval)
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() > self.deadline:
                return
            next_at += self.interval * rng.uniform(0.7, 1.3)  # open loop: on schedule, not after the reply
            kind = rng.choices(["normal", "cut", "retry", "refused", "midfail"], [55, 15, 15, 5, 10])[0]
            sent = Sent(task, index, uuid.uuid4().hex, kind)
            index += 1
            self.sent.append(sent)
            words = f"{task} round {sent.index}"
            content = {
                "normal": f"{words} {SHORT}",
                "cut": f"{words} {LONG}",
                "retry": f"{words} {LONG}",
                "refused": f"{words} [[status:500]]",
                "midfail": f"{words} [[words:30]] [[fail_after:{rng.randint(1, 20)}]] [[delay:0.005]]",
            }[kind]
            cut = rng.randint(1, 40) if kind in ("cut", "retry") else None
            first = await self.attempt(client, sent, content, cut)
            sent.attempts.append(first)
            if kind == "retry":  # the orchestrator gave up on the first attempt and asks again
                sent.attempts.append(await self.attempt(client, sent, content, None))
            while sent.attempts[-1].outcome == "down" and time.monotonic() < self.deadline + 30:
                await self.up.wait()  # the server is back: retry what the crash cut
                sent.attempts.append(await self.attempt(client, sent, content, None))

    async def killer(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if time.monotonic() > self.deadline - 5:
                return
            self.up.clear()
            self.proxy.kill()
            self.kills += 1
            await asyncio.to_thread(self.proxy.start)
            self.life += 1
            self.up.set()

    async def sample_rss(self) -> None:
        while time.monotonic() < self.deadline:
            if not self.up.is_set():  # between a kill and the restarted server being ready
                await asyncio.sleep(0.5)
                continue
            try:
                status = Path(f"/proc/{self.proxy.pid}/status").read_text()
                kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
                self.rss.append((time.monotonic() - self.started, self.life, kb / 1024))
            except (OSError, StopIteration):
                pass
            await asyncio.sleep(5)

    async def run(self, kill_every: float) -> None:
        limits = httpx.Limits(max_connections=self.conversations * 2, max_keepalive_connections=self.conversations)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30), limits=limits) as client:
            background = [asyncio.create_task(self.killer(kill_every)), asyncio.create_task(self.sample_rss())]
            await asyncio.gather(*(self.conversation(client, n) for n in range(self.conversations)))
            for job in background:
                job.cancel()


def _stored(conn: Connection, prefix: str) -> dict[str, dict[str, Any]]:
    """Every stored round of the soak's tasks by request id: task, seq, status, last reply."""
    rounds = conn.execute(
        select(Round.id, Round.task_id, Round.seq, Round.request_id, Round.status, Round.interrupted)
        .where(Round.task_id.startswith(prefix))
    ).all()
    replies: dict[str, str] = {}
    for round_id, content in conn.execute(
        select(Message.round_id, Message.content)
        .join(Round, Round.id == Message.round_id)
        .where(Round.task_id.startswith(prefix), Message.role == "assistant")
        .order_by(Message.round_id, Message.position)
    ):
        replies[round_id] = content or ""
    by_request: dict[str, dict[str, Any]] = {}
    for row in rounds:
        entry = {"task": row.task_id, "seq": row.seq, "status": row.status, "interrupted": row.interrupted,
                 "reply": replies.get(row.id, ""), "copies": by_request.get(row.request_id, {}).get("copies", 0) + 1}
        by_request[row.request_id] = entry
    return by_request


def _settled(url: str) -> dict[str, dict[str, Any]]:
    """The stored rounds once the server has stored the last cut streams (it does so after their
    clients left), or as they are after 15 s."""
    deadline = time.monotonic() + 15
    while True:
        stored = run_db(url, _stored, "soak-")
        if time.monotonic() > deadline or not any(row["status"] == "pending" for row in stored.values()):
            return stored
        time.sleep(0.2)


def audit(sent: list[Sent], stored: dict[str, dict[str, Any]]) -> tuple[Counter[str], list[str]]:
    """What each round's client saw against what is stored: the counts, and every violation."""
    seen: Counter[str] = Counter()
    problems: list[str] = []
    for s in sent:
        row = stored.get(s.request_id)
        outcomes = [a.outcome for a in s.attempts]
        seen.update(outcomes)
        if len(outcomes) > 1:
            seen["retried"] += 1
        completed = [a for a in s.attempts if a.outcome == "completed"]
        where = f"{s.task} round {s.index} ({s.kind}, {outcomes})"
        if row is None:
            if outcomes[-1] != "refused":
                problems.append(f"{where}: not stored")
            continue
        if outcomes[-1] == "refused":
            problems.append(f"{where}: refused before its first token, yet stored {row['status']}")
            continue
        if row["copies"] != 1:
            problems.append(f"{where}: stored {row['copies']} times")
        if row["status"] == "pending":
            problems.append(f"{where}: left pending")
        if completed:
            if row["status"] != "completed" or row["reply"] != completed[-1].text:
                problems.append(f"{where}: seen complete, stored {row['status']} {row['reply'][:40]!r}")
            if len({a.text for a in completed}) != 1:
                problems.append(f"{where}: a replay differs from the reply")
        elif outcomes[-1] in ("cut", "failed", "down"):
            received = s.attempts[-1].text
            if row["status"] == "completed" and outcomes[-1] != "cut":
                problems.append(f"{where}: stored completed")
            if row["status"] == "interrupted" and not row["interrupted"]:
                problems.append(f"{where}: interrupted without the mark")
            crashed = outcomes[-1] == "down" and row["reply"] == ""
            if not crashed and not row["reply"].startswith(received):
                problems.append(f"{where}: stored {row['reply'][:40]!r}, client saw {received[:40]!r}")
    by_task: dict[str, list[tuple[int, int]]] = {}
    for s in sent:
        row = stored.get(s.request_id)
        if row is not None:
            by_task.setdefault(s.task, []).append((s.index, row["seq"]))
    for task, pairs in by_task.items():
        seqs = [seq for _index, seq in sorted(pairs)]
        if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
            problems.append(f"{task}: rounds out of order {seqs}")
    return seen, problems


def _rss_summary(rss: list[tuple[float, int, float]]) -> list[list[str]]:
    """Per life of the server: RSS after its first minute (warm) and at its end."""
    rows = []
    for life in sorted({life for _t, life, _mb in rss}):
        samples = [(t, mb) for t, lf, mb in rss if lf == life]
        start = samples[0][0]
        warm = [mb for t, mb in samples if t - start >= min(60.0, (samples[-1][0] - start) / 2)] or [samples[0][1]]
        rows.append([str(life), f"{samples[-1][0] - start:.0f}", f"{warm[0]:.1f}", f"{samples[-1][1]:.1f}",
                     f"{samples[-1][1] - warm[0]:+.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between a conversation's rounds")
    parser.add_argument("--kill-every", type=float, default=150.0, help="seconds between kill -9 + restart")
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--postgres-url", default=os.environ.get("TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--quick", action="store_true", help="16 s, 20 conversations, one kill")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.conversations, args.kill_every = 16 / 60, 20, 8.0

    with tempfile.TemporaryDirectory(prefix="trtc-soak-") as tmp:
        workdir = Path(tmp)
        drop = None
        if args.db == "sqlite":
            url = f"sqlite:///{workdir / 'soak.db'}"
        else:
            from sqlalchemy.engine import make_url

            name = f"trtc_soak_{uuid.uuid4().hex[:8]}"
            asyncio.run(create_postgres_database(args.postgres_url, name))
            url = make_url(args.postgres_url).set(database=name).render_as_string(hide_password=False)
            drop = lambda: asyncio.run(drop_postgres_database(args.postgres_url, name))  # noqa: E731
        try:
            upgrade(url)
            upstream = Upstream(workdir / "upstream.log", record=False)
            upstream.start()
            proxy = Proxy(workdir / "proxy", {"DATABASE_URL": url, "UPSTREAM_BASE_URL": upstream.base_url, "LOG_LEVEL": "WARNING"})
            proxy.start()
            soak = Soak(proxy, args.conversations, args.interval, args.minutes * 60)
            try:
                asyncio.run(soak.run(args.kill_every))
                stored = _settled(url)
            finally:
                proxy.stop()
                upstream.stop()
        finally:
            if drop is not None:
                drop()

    seen, problems = audit(soak.sent, stored)
    pending = sum(1 for row in stored.values() if row["status"] == "pending")
    command = "python bench/soak.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = [
        ["rounds sent", str(len(soak.sent))],
        ["HTTP attempts", str(sum(len(s.attempts) for s in soak.sent))],
        ["seen completed", str(seen["completed"])],
        ["cut by the client", str(seen["cut"])],
        ["failed mid-stream (upstream error event)", str(seen["failed"])],
        ["refused before the first token (upstream 5xx)", str(seen["refused"])],
        ["cut by a crash (kill -9)", str(seen["down"])],
        ["retried with the same request id", str(seen["retried"])],
        ["kill -9 + restart", str(soak.kills)],
        ["rounds stored", str(len(stored))],
        ["left pending", str(pending)],
        ["audit violations", str(len(problems))],
    ]
    section = "\n".join([
        "## Soak: nothing lost under faults (`bench/soak.py`)",
        "",
        f"Command: `{command.strip()}` (via `make bench-soak`), {datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{os.cpu_count()} cores, {args.db}, {args.conversations} conversations, a round every ~{args.interval:g} s "
        f"each for {args.minutes:g} min, kill -9 + restart every {args.kill_every:g} s. The audit compares every "
        "round's stored form with what its client saw (see the script's docstring).",
        "",
        table(["", "count"], summary),
        "",
        "Server RSS (MB) per life of the process (a kill starts a new one): after its first minute (or half "
        "its life) and at its end.",
        "",
        table(["life", "seconds", "RSS warm", "RSS end", "growth"], _rss_summary(soak.rss)),
    ])
    print(section)
    for problem in problems[:30]:
        print("VIOLATION:", problem)
    if not args.no_write:
        write_section("soak", section)
    if problems or pending:
        sys.exit(1)


if __name__ == "__main__":
    main()
