"""Rolling summaries (`memory/`) through real HTTP on both databases: rounds that leave a small
window are folded, in the background, into a summary the context carries; the live round never
waits for the memory upstream; a 905 that cuts a summarised round makes it redo the summary; a
deleted task takes its summary along."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from llm_proxy.agents import SUMMARY_HEADING
from llm_proxy.memory_context import MAX_BEHIND
from memory.models import Summary
from orchestrator.protocol import sign
from core.logs import JsonFormatter
from tests.conftest import ADMIN_KEY, CALLBACK_KEY
from tests.support import Upstream, headers, marker, run_db, wait_until

WINDOW = 4


def _config(upstream: Upstream, folder: Path, summarizer: str) -> str:
    config = folder / "profiles.yaml"
    config.write_text(
        "profiles:\n"
        "  - name: companion\n"
        "    default: true\n"
        f"    history: {{max_rounds: {WINDOW}}}\n"
        "    memory:\n"
        "      summary: true\n"
        f"      upstream: {{base_url: '{upstream.base_url}', model: '{summarizer}'}}\n"
        "      max_chars: 4000\n"
    )
    return str(config)


def _summary(server: Any, task_id: str) -> dict[str, Any] | None:
    def fetch(conn: Any) -> dict[str, Any] | None:
        row = conn.execute(select(Summary.__table__).where(Summary.task_id == task_id)).mappings().first()
        return dict(row) if row else None

    return run_db(server.database_url, fetch)


def _ask(server: Any, task_id: str, text: str) -> None:
    server.client(timeout=10).chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], extra_headers=headers(task_id)
    )


@pytest.fixture
def memory_proxy(start_proxy, upstream: Upstream, migrated_url: str, tmp_path: Path) -> Any:
    env = {"DATABASE_URL": migrated_url, "CONFIG_FILE": _config(upstream, tmp_path, "m[[summarize:1]]"),
           "ADMIN_API_KEYS": ADMIN_KEY, "CALLBACK_SIGN_KEY": CALLBACK_KEY}
    return start_proxy(env, in_process=True)


def test_rounds_that_leave_the_window_are_carried_by_the_summary(memory_proxy: Any, upstream: Upstream) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    first = f"{tag} 0 my daughter's name is Mia"
    carried = []
    for n in range(120):
        _ask(memory_proxy, task_id, first if n == 0 else f"{tag} {n}")
        # The prompt stays bounded: the summary, the window's rounds, the rounds between the two
        # while a fold catches up (at most MAX_BEHIND) and the new turn.
        rounds = (len(upstream.requests(f"{tag} {n}")[-1]["messages"]) - 2) // 2
        assert rounds <= WINDOW + MAX_BEHIND
        carried.append(rounds)
    # Folded ahead, the summary mostly keeps up: the prompt is the window's size, give or take a round.
    assert sum(carried[WINDOW:]) / len(carried[WINDOW:]) <= WINDOW + 1
    # The last round reads rounds 117-120 (seq): once the summary covers round 116, nothing lies between.
    wait_until(lambda: (_summary(memory_proxy, task_id) or {}).get("through_seq", 0) >= 116, timeout=30,
               what="the summary through round 116")
    _ask(memory_proxy, task_id, f"{tag} last")
    sent = upstream.requests(f"{tag} last")[-1]["messages"]
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith(SUMMARY_HEADING)
    assert f"User: {first}" in sent[0]["content"]  # the first round's fact, 120 rounds later
    assert f"User: {tag} 115\n" in sent[0]["content"] + "\n"
    assert [m["content"] for m in sent[1::2]] == [f"{tag} {n}" for n in range(116, 120)] + [f"{tag} last"]
    # The admin API shows it.
    detail = httpx.get(memory_proxy.url + f"/admin/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert detail["summary"]["through_seq"] >= 116 and f"User: {first}" in detail["summary"]["text"]
    # The task's deletion takes its summary along.
    deleted = httpx.delete(memory_proxy.url + f"/admin/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert deleted.status_code == 200 and _summary(memory_proxy, task_id) is None


def test_the_live_round_never_waits_for_the_summarizer(start_proxy, upstream: Upstream, migrated_url: str, tmp_path: Path) -> None:
    # A memory upstream that answers after a minute: each round (10 s client timeout) would fail
    # if it waited for the summary.
    config = _config(upstream, tmp_path, "m[[summarize:1]] [[first_delay:60]]")
    server = start_proxy({"DATABASE_URL": migrated_url, "CONFIG_FILE": config}, in_process=True)
    tag = marker()
    task_id = f"task-{tag}"
    for n in range(WINDOW + 4):  # a fold is asked for once a round left the window (round 6)
        _ask(server, task_id, f"{tag} {n}")
    summarizing = wait_until(lambda: [r for r in upstream.requests("Summary so far") if tag in str(r)],
                             timeout=10, what="a summary asked for")
    assert summarizing and len(server.rounds(task_id)) == WINDOW + 4
    assert (_summary(server, task_id) or {}).get("through_seq", 0) == 0  # still being written


def test_a_905_that_cuts_a_summarised_round_has_the_summary_redone(memory_proxy: Any) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    _ask(memory_proxy, task_id, f"{tag} 0 [[reply:Sure. I will remember that for you.]]")
    for n in range(1, WINDOW + 2):
        _ask(memory_proxy, task_id, f"{tag} {n}")
    wait_until(lambda: (_summary(memory_proxy, task_id) or {}).get("through_seq", 0) >= 1, timeout=30, what="round 1 summarised")
    body = json.dumps({"EventGroupId": 9, "EventType": 905, "CallbackTs": 1, "EventInfo": {
        "EventMsTs": 1, "TaskId": task_id, "Payload": {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Sure."}}}).encode()
    assert httpx.post(memory_proxy.url + "/api/v1/trtc/callback", content=body,
                      headers={"Sign": sign(CALLBACK_KEY, body)}).json() == {"code": 0}
    assert memory_proxy.rounds(task_id)[0]["messages"][-1]["content"] == "Sure."
    assert (_summary(memory_proxy, task_id) or {})["stale"]
    _ask(memory_proxy, task_id, f"{tag} after")  # asks for the fold again: redone from round 1
    wait_until(lambda: not (s := _summary(memory_proxy, task_id) or {}).get("stale", True) and s["through_seq"] >= 1,
               timeout=30, what="the summary redone")


def test_one_process_writes_a_tasks_summary_at_a_time_and_a_crashed_writer_is_replaced(migrated_url: str) -> None:
    """Two processes asking for the same task's fold: the second waits its turn (nothing taken);
    a writer that crashed (its hold ran out) is replaced, from the last summary it wrote."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from llm_proxy import store as chat_store
    from memory import store

    task_id = f"task-{marker()}"
    run_db(migrated_url, lambda conn: chat_store.claim_round(conn, chat_store.TaskInfo(task_id), max_rounds=5))
    assert run_db(migrated_url, store.take, task_id, "process-a") == (0, "")
    assert run_db(migrated_url, store.take, task_id, "process-b") is None
    assert run_db(migrated_url, store.write, task_id, "process-a", 3, "what a wrote")
    assert not run_db(migrated_url, store.write, task_id, "process-b", 5, "not b's to write")
    # Process a crashes mid-summary: its hold runs out; b goes on from what a wrote.
    run_db(migrated_url, lambda conn: conn.execute(
        update(Summary).where(Summary.task_id == task_id).values(writer_until=datetime.now(timezone.utc) - timedelta(seconds=1))))
    assert run_db(migrated_url, store.take, task_id, "process-b") == (3, "what a wrote")
    run_db(migrated_url, store.release, task_id, "process-b")
    assert run_db(migrated_url, store.view, task_id, None, "m").summary == "what a wrote"


def test_the_memory_fields_are_checked(tmp_path: Path) -> None:
    from llm_proxy.profiles import ConfigError, load_file

    config = tmp_path / "profiles.yaml"
    config.write_text("profiles:\n  - {name: a, memory: {summary: true, user_id: meta.user_id, max_chars: 500}}\n")
    assert load_file(config).profiles[0].memory.max_chars == 500
    for wrong, said in (("per_user: maybe", "per_user"), ("user_id: body.x", "user_id"), ("max_chars: 5", "max_chars")):
        config.write_text(f"profiles:\n  - {{name: a, memory: {{{wrong}}}}}\n")
        with pytest.raises(ConfigError) as refused:
            load_file(config)
        assert said in str(refused.value)


def test_a_memory_upstream_that_answers_nothing_leaves_the_summary_as_it_was(
    start_proxy, upstream: Upstream, migrated_url: str, tmp_path: Path
) -> None:
    """Its empty answer is a failed fold, not an empty summary over rounds now out of every
    context; the failure is logged with the fold's own task, not a request's id (each line as the
    server writes it: formatted where it is logged, which is where its context is)."""
    lines: list[dict[str, Any]] = []

    class Written(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter().format(record)))

    handler = Written()
    logging.getLogger("trtc.memory").addHandler(handler)
    try:
        server = start_proxy({"DATABASE_URL": migrated_url, "CONFIG_FILE": _config(upstream, tmp_path, "m[[reply:  ]]")},
                             in_process=True)
        task_id = f"task-{marker()}"
        for n in range(WINDOW + 2):
            _ask(server, task_id, f"turn {n}")

        def failure() -> dict[str, Any] | None:
            return next((line for line in lines if line.get("task_id") == task_id and line["msg"].startswith("memory not written")), None)

        logged = wait_until(failure, what="the failed fold logged")
    finally:
        logging.getLogger("trtc.memory").removeHandler(handler)
    assert logged["fold"] == "summary" and "request_id" not in logged and "no text" in logged["msg"]
    summary = _summary(server, task_id)
    assert summary is not None and (summary["through_seq"], summary["text"]) == (0, "")
