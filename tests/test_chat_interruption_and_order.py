"""Interruption (rule 5), ordering of overlapping rounds (rule 6), many tasks at once, restarts
and several server processes sharing one database."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from tests.support import API_KEY, Proxy, Upstream, first_text, headers, marker, wait_until

SYSTEM = {"role": "system", "content": "Be brief."}


def _user(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


def test_client_closing_the_stream_cancels_upstream_and_keeps_what_was_sent(
    proxy: Proxy, client: openai.OpenAI, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    stream = client.chat.completions.create(
        model="m", stream=True, extra_headers=headers(task_id),
        messages=_user(f"{tag} [[words:300]] [[delay:0.02]]"),
    )
    received = ""
    words = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += chunk.choices[0].delta.content
            words += 1
            if words == 3:
                break
    stream.close()

    [cut] = wait_until(lambda: upstream.abandoned(tag), timeout=5, what="upstream stream abandoned")
    assert cut["sent"] < 60, "the upstream kept generating after the client left"
    [stored] = wait_until(lambda: proxy.rounds(task_id), timeout=5, what="interrupted round stored")
    assert stored["status"] == "interrupted" and stored["interrupted"]
    partial = stored["messages"][-1]
    assert partial["role"] == "assistant"
    full = " ".join(f"w{i}" for i in range(300))
    assert partial["content"].startswith(received) and full.startswith(partial["content"])
    assert len(partial["content"]) < len(full)

    client.chat.completions.create(model="m", messages=_user(f"{tag} next"), extra_headers=headers(task_id))
    context = upstream.requests(f"{tag} next")[0]["messages"]
    assert context[1:3] == [{"role": "user", "content": f"{tag} [[words:300]] [[delay:0.02]]"}, partial]


def test_client_leaving_before_the_first_token_keeps_the_user_turn(
    proxy: Proxy, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    body = {"model": "m", "stream": False, "messages": _user(f"{tag} [[first_delay:3]]")}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            proxy.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5),
            headers={"Authorization": f"Bearer {API_KEY}", **headers(task_id)},
        )
    wait_until(lambda: upstream.abandoned(tag), timeout=5, what="upstream request cancelled")
    [stored] = wait_until(lambda: proxy.rounds(task_id), timeout=5, what="round stored")
    assert stored["interrupted"]
    assert stored["messages"] == [
        {"role": "user", "content": f"{tag} [[first_delay:3]]"},
        {"role": "assistant", "content": ""},
    ]
    proxy.client().chat.completions.create(model="m", messages=_user(f"{tag} again"), extra_headers=headers(task_id))
    # The empty reply is not sent upstream; the user's earlier words are.
    assert upstream.requests(f"{tag} again")[0]["messages"][1:] == [
        {"role": "user", "content": f"{tag} [[first_delay:3]]"},
        {"role": "user", "content": f"{tag} again"},
    ]


@pytest.mark.parametrize("history", [0, 1, 5])
def test_the_orchestrators_history_never_sends_a_user_turn_twice(
    proxy: Proxy, upstream: Upstream, task_id: str, history: int
) -> None:
    """A turn abandoned before the first word stays in the orchestrator's record after the bot's
    last words; with `History` > 0 it comes again with the next turn, and is sent upstream once."""
    tag = marker()
    first, reply = f"{tag} first [[reply:Sure.]]", "Sure."
    lost = f"{tag} lost [[first_delay:3]]"
    proxy.client().chat.completions.create(model="m", messages=_user(first), extra_headers=headers(task_id))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            proxy.url + "/v1/chat/completions", timeout=httpx.Timeout(30, read=0.5),
            json={"model": "m", "messages": _user(lost)}, headers={"Authorization": f"Bearer {API_KEY}", **headers(task_id)},
        )
    wait_until(lambda: len(proxy.rounds(task_id)) == 2, timeout=5, what="the abandoned round stored")
    record = [{"role": "user", "content": first}, {"role": "assistant", "content": reply}, {"role": "user", "content": lost}]
    sent = [SYSTEM, *record[len(record) - min(history, 3) :], {"role": "user", "content": f"{tag} next"}] if history else _user(f"{tag} next")
    retry = headers(task_id)
    for _attempt in range(2):  # and its retry, which replays
        answer = proxy.client().chat.completions.create(model="m", messages=sent, extra_headers=retry)
        assert answer.choices[0].message.content
    [request] = upstream.requests(f"{tag} next")
    assert request["messages"] == [SYSTEM, *record, {"role": "user", "content": f"{tag} next"}]
    assert proxy.rounds(task_id)[2]["messages"][0] == {"role": "user", "content": f"{tag} next"}


def test_a_round_arriving_while_the_previous_streams_waits_for_it(
    proxy: Proxy, client: openai.OpenAI, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    first_text: list[str] = []
    first_started = threading.Event()

    def first_round() -> None:
        stream = client.chat.completions.create(
            model="m", stream=True, extra_headers=headers(task_id),
            messages=_user(f"{tag} first [[words:20]] [[delay:0.02]]"),
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first_started.set()
                first_text.append(chunk.choices[0].delta.content)

    worker = threading.Thread(target=first_round)
    worker.start()
    assert first_started.wait(10)
    second = client.chat.completions.create(model="m", messages=_user(f"{tag} second"), extra_headers=headers(task_id))
    worker.join(10)
    assert second.choices[0].message.content == f"You said: {tag} second"
    full_first = "".join(first_text)
    assert full_first == " ".join(f"w{i}" for i in range(20))
    assert upstream.requests(f"{tag} second")[0]["messages"][1:] == [
        {"role": "user", "content": f"{tag} first [[words:20]] [[delay:0.02]]"},
        {"role": "assistant", "content": full_first},
        {"role": "user", "content": f"{tag} second"},
    ]
    assert [(r["seq"], r["messages"][0]["content"]) for r in proxy.rounds(task_id)] == [
        (1, f"{tag} first [[words:20]] [[delay:0.02]]"),
        (2, f"{tag} second"),
    ]


def test_thirty_two_tasks_talking_at_once(proxy: Proxy, upstream: Upstream) -> None:
    tag = marker()
    tasks = [f"{tag}-t{i}" for i in range(32)]
    rounds_per_task = 4

    async def conversation(client: openai.AsyncOpenAI, task_id: str) -> list[str]:
        replies = []
        for n in range(rounds_per_task):
            stream = await client.chat.completions.create(
                model="m", stream=True, extra_headers=headers(task_id),
                messages=_user(f"{task_id} says {n} [[delay:0.005]]"),
            )
            replies.append("".join([c.choices[0].delta.content or "" async for c in stream if c.choices]))
        return replies

    async def everyone() -> list[list[str]]:
        async with proxy.async_client() as client:
            return await asyncio.gather(*(conversation(client, t) for t in tasks))

    results = asyncio.run(everyone())
    for task_id, replies in zip(tasks, results):
        assert replies == [f"You said: {task_id} says {n}" for n in range(rounds_per_task)]
        stored = proxy.rounds(task_id)
        assert [r["seq"] for r in stored] == list(range(1, rounds_per_task + 1))
        last_context = upstream.requests(f"{task_id} says {rounds_per_task - 1}")[0]["messages"]
        users = [m["content"] for m in last_context if m["role"] == "user"]
        assert users == [f"{task_id} says {n} [[delay:0.005]]" for n in range(rounds_per_task)]


def test_restart_with_the_same_database_keeps_the_conversation(
    start_proxy, upstream: Upstream, tmp_path, migrated_url: str
) -> None:
    server = start_proxy({"DATABASE_URL": migrated_url}, workdir=tmp_path / "restart")
    tag = marker()
    task_id = f"task-{tag}"
    server.client().chat.completions.create(model="m", messages=_user(f"{tag} before"), extra_headers=headers(task_id))
    server.restart()
    server.client().chat.completions.create(model="m", messages=_user(f"{tag} after"), extra_headers=headers(task_id))
    assert upstream.requests(f"{tag} after")[0]["messages"][1:] == [
        {"role": "user", "content": f"{tag} before"},
        {"role": "assistant", "content": f"You said: {tag} before"},
        {"role": "user", "content": f"{tag} after"},
    ]


@pytest.fixture
def two_servers(start_proxy, migrated_url: str) -> tuple[Proxy, Proxy]:
    """Two server processes sharing one database."""
    return start_proxy({"DATABASE_URL": migrated_url}), start_proxy({"DATABASE_URL": migrated_url})


def test_two_server_processes_serve_one_task_in_turn(two_servers: tuple[Proxy, Proxy], upstream: Upstream) -> None:
    one, two = two_servers
    tag = marker()
    task_id = f"task-{tag}"
    for n in range(6):
        server = (one, two)[n % 2]
        server.client().chat.completions.create(model="m", messages=_user(f"{tag} {n}"), extra_headers=headers(task_id))
    users = [m["content"] for m in upstream.requests(f"{tag} 5")[0]["messages"] if m["role"] == "user"]
    assert users == [f"{tag} {n}" for n in range(6)]
    assert [r["seq"] for r in one.rounds(task_id)] == [1, 2, 3, 4, 5, 6]

    # Overlap across processes: the round on the second server waits for the one streaming on
    # the first (it can only learn of it through the database).
    first_done = []

    def slow_round() -> None:
        stream = one.client().chat.completions.create(
            model="m", stream=True, extra_headers=headers(task_id),
            messages=_user(f"{tag} slow [[words:15]] [[delay:0.03]]"),
        )
        first_done.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    worker = threading.Thread(target=slow_round)
    worker.start()
    wait_until(lambda: upstream.requests(f"{tag} slow"), what="slow round reached the upstream")
    two.client().chat.completions.create(model="m", messages=_user(f"{tag} overlap"), extra_headers=headers(task_id))
    worker.join(10)
    context = upstream.requests(f"{tag} overlap")[0]["messages"]
    assert context[-3:] == [
        {"role": "user", "content": f"{tag} slow [[words:15]] [[delay:0.03]]"},
        {"role": "assistant", "content": first_done[0]},
        {"role": "user", "content": f"{tag} overlap"},
    ]


def test_a_round_redone_by_another_process_reaches_the_first_ones_next_context(
    two_servers: tuple[Proxy, Proxy], upstream: Upstream
) -> None:
    # Each process keeps a copy of the task's history; an interrupted round being answered again
    # by the other process must make the first one wait for the new reply, not send the old one.
    one, two = two_servers
    tag = marker()
    task_id = f"task-{tag}"
    one.client().chat.completions.create(model="m", messages=_user(f"{tag} before"), extra_headers=headers(task_id))
    # The retry brings the same words (the fake upstream's behaviour is steered by the model name).
    stream = one.client().chat.completions.create(
        model="m[[words:400]] [[delay:0.01]]", stream=True, extra_headers=headers(task_id, f"req-{tag}"),
        messages=_user(f"{tag} cut"),
    )
    first_text(stream)
    stream.close()
    wait_until(lambda: len(one.rounds(task_id)) == 2 and one.rounds(task_id)[1]["interrupted"], what="interrupted round")
    redo = threading.Thread(
        target=lambda: two.client().chat.completions.create(
            model="m[[words:10]] [[delay:0.05]]", messages=_user(f"{tag} cut"), extra_headers=headers(task_id, f"req-{tag}")
        )
    )
    redo.start()
    wait_until(lambda: len(upstream.requests(f"{tag} cut")) == 2, what="the retry reached the upstream")
    one.client().chat.completions.create(model="m", messages=_user(f"{tag} after"), extra_headers=headers(task_id))
    redo.join(10)
    context = upstream.requests(f"{tag} after")[0]["messages"]
    assert context[-2:] == [
        {"role": "assistant", "content": " ".join(f"w{i}" for i in range(10))},
        {"role": "user", "content": f"{tag} after"},
    ]
