"""The orchestrator's server callbacks through real HTTP on both databases: the signature, every
event type stored once, 905 cutting the stored reply to what the user heard (English and
Chinese, before and after the next round began, or matching nothing), and the orchestrator's
metrics on /metrics."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Connection

from orchestrator.models import CallbackEvent
from orchestrator.protocol import sign
from tests.conftest import ADMIN_KEY, CALLBACK_KEY
from tests.support import Proxy, Upstream, headers, marker, run_db, wait_until

PATH = "/api/v1/trtc/callback"
SYSTEM = {"role": "system", "content": "Be brief."}


def _body(event_type: int, task_id: str, payload: dict[str, Any], *, event_ms: int | None = None) -> dict[str, Any]:
    return {
        "EventGroupId": 9,
        "EventType": event_type,
        "CallbackTs": int(time.time() * 1000),
        "EventInfo": {
            "EventMsTs": event_ms if event_ms is not None else int(time.time() * 1000),
            "TaskId": task_id,
            "RoomId": "room-1",
            "RoomIdType": 1,
            "Payload": payload,
        },
    }


def _post(server: Proxy, body: dict[str, Any] | bytes, *, key: str | None = CALLBACK_KEY, signature: str | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers_ = {"Content-Type": "application/json", "SdkAppId": "1400000000"}
    if signature is not None:
        headers_["Sign"] = signature
    elif key is not None:
        headers_["Sign"] = sign(key, raw)
    return httpx.post(server.url + PATH, content=raw, headers=headers_, timeout=10)


def _events(server: Proxy, task_id: str) -> list[tuple[int, str | None, str | None]]:
    def fetch(conn: Connection) -> list[tuple[int, str | None, str | None]]:
        rows = conn.execute(
            select(CallbackEvent.event_type, CallbackEvent.trtc_round_id, CallbackEvent.round_id)
            .where(CallbackEvent.task_id == task_id)
            .order_by(CallbackEvent.id)
        )
        return [tuple(row) for row in rows]

    return run_db(server.database_url, fetch)


def _chat(server: Proxy, task_id: str, text: str) -> str:
    reply = server.client().chat.completions.create(
        model="m", extra_headers=headers(task_id), messages=[SYSTEM, {"role": "user", "content": text}]
    )
    return reply.choices[0].message.content or ""


def test_a_signed_event_is_answered_with_code_0_and_stored(proxy: Proxy, task_id: str) -> None:
    response = _post(proxy, _body(901, task_id, {"Status": 0}))
    assert response.status_code == 200 and response.json() == {"code": 0}
    assert _events(proxy, task_id) == [(901, None, None)]


@pytest.mark.parametrize("fault", ["wrong", "missing", "other-key", "changed-after-signing"])
def test_a_bad_signature_is_401_and_stores_nothing(proxy: Proxy, task_id: str, fault: str) -> None:
    body = json.dumps(_body(901, task_id, {"Status": 0})).encode()
    if fault == "wrong":
        response = _post(proxy, body, signature="bm90IGEgc2lnbmF0dXJl")
    elif fault == "missing":
        response = _post(proxy, body, key=None)
    elif fault == "other-key":
        response = _post(proxy, body, key="someOtherKey1")
    else:
        signature = sign(CALLBACK_KEY, body)
        response = _post(proxy, body.replace(b'"Status": 0', b'"Status": 1'), signature=signature)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_signature"
    assert _events(proxy, task_id) == []


def test_without_a_key_callbacks_are_refused_and_the_log_says_why(start_proxy, task_id: str) -> None:
    server = start_proxy({})
    response = _post(server, _body(901, task_id, {"Status": 0}))
    assert response.status_code == 401 and response.json()["error"]["code"] == "callbacks_off"
    assert "CALLBACK_SIGN_KEY is not set" in server.logs() and "CALLBACK_ALLOW_UNSIGNED=true" in server.logs()
    assert _events(server, task_id) == []


def test_unsigned_callbacks_are_taken_only_when_asked_and_never_with_a_key(start_proxy, task_id: str) -> None:
    unsigned = start_proxy({"CALLBACK_ALLOW_UNSIGNED": "true"})
    assert "callbacks are accepted unsigned" in unsigned.logs()
    response = _post(unsigned, _body(901, task_id, {"Status": 0}), key=None)
    assert response.status_code == 200 and response.json() == {"code": 0}
    assert [event_type for event_type, _r, _o in _events(unsigned, task_id)] == [901]
    keyed = start_proxy({"CALLBACK_ALLOW_UNSIGNED": "true", "CALLBACK_SIGN_KEY": CALLBACK_KEY}, in_process=True)
    response = _post(keyed, _body(901, task_id, {"Status": 0}), key=None)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_signature"
    assert _events(keyed, task_id) == []


# The documentation's own example: key 123654 and an event-204 body, whose `",,"` (a typo: the
# body is then no JSON) is read as one comma; the signature is the one the documentation gives.
DOC_KEY = "123654"
DOC_BODY = (
    '{\n\t"EventGroupId":\t2,\n\t"EventType":\t204,\n\t"CallbackTs":\t1664209748188,\n'
    '\t"EventInfo":\t{\n\t\t"RoomId":\t8489,\n\t\t"EventTs":\t1664209748,\n'
    '\t\t"EventMsTs":\t1664209748180,\n\t\t"UserId":\t"user_85034614",\n\t\t"Reason":\t0\n\t}\n}'
)
DOC_SIGN = "kkoFeO3Oh2ZHnjtg8tEAQhtXK16/KI05W3BQff8IvGA="


def test_the_documentations_signature_example_is_accepted(start_proxy) -> None:
    assert sign(DOC_KEY, DOC_BODY.encode()) == DOC_SIGN
    server = start_proxy({"CALLBACK_SIGN_KEY": DOC_KEY}, in_process=True)
    response = _post(server, DOC_BODY.encode(), signature=DOC_SIGN)
    assert response.status_code == 200 and response.json() == {"code": 0}

    def stored(conn: Connection) -> list[Any]:
        return list(conn.execute(select(CallbackEvent.event_type, CallbackEvent.event_ms_ts).where(CallbackEvent.event_type == 204)))

    assert run_db(server.database_url, stored) == [(204, 1664209748180)]
    forged = DOC_BODY.replace("8489", "8490").encode()
    assert _post(server, forged, signature=DOC_SIGN).status_code == 401


def test_every_event_type_and_an_unknown_one_are_stored_once(proxy: Proxy, task_id: str) -> None:
    payloads = {
        901: {"Status": 0},
        909: {"Status": "session_ready"},
        904: {"UserId": "user-1", "RoundId": "r1"},
        903: {"UserId": "user-1", "Text": "hello", "StartTimeMs": 1, "EndTimeMs": 2, "RoundId": "r1"},
        905: {"UserId": "bot", "RoundId": "r1", "Text": "hi"},
        906: {"Metric": "llm_first_token", "Value": 640, "Tag": {"RoundId": "r1"}},
        908: {"Metric": "llm_error", "Tag": {"RoundId": "r1", "Code": 30200, "Message": "timeout"}},
        902: {"LeaveCode": 0},
        977: {"Something": "new"},
    }
    for event_type, payload in payloads.items():
        body = _body(event_type, task_id, payload, event_ms=1_700_000_000_000 + event_type)
        for resend in range(3):  # resent as the orchestrator does, with a new CallbackTs
            body["CallbackTs"] += resend
            response = _post(proxy, body)
            assert response.status_code == 200 and response.json() == {"code": 0}
    assert sorted(event_type for event_type, _r, _o in _events(proxy, task_id)) == sorted(payloads)


LONG_REPLY = "Hello there. I can help you book a table for tonight, or suggest a quiet place nearby."


def test_905_cuts_an_english_reply_mid_sentence(proxy: Proxy, upstream: Upstream, task_id: str) -> None:
    tag = marker()
    assert _chat(proxy, task_id, f"{tag} book [[reply:{LONG_REPLY}]]") == LONG_REPLY
    response = _post(proxy, _body(905, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Hello there.  I can help you book"}))
    assert response.json() == {"code": 0}
    [stored] = proxy.rounds(task_id)
    assert stored["interrupted"] and stored["status"] == "interrupted"
    assert stored["messages"][-1] == {"role": "assistant", "content": "Hello there. I can help you book"}
    _chat(proxy, task_id, f"{tag} next")
    assert upstream.requests(f"{tag} next")[0]["messages"][1:] == [
        {"role": "user", "content": f"{tag} book [[reply:{LONG_REPLY}]]"},
        {"role": "assistant", "content": "Hello there. I can help you book"},
        {"role": "user", "content": f"{tag} next"},
    ]
    # The orchestrator's RoundId now names the round: a metric for it is tied to it.
    _post(proxy, _body(906, task_id, {"Metric": "tts_first_frame_latency", "Value": 310, "Tag": {"RoundId": f"r-{tag}"}}))
    our_round = _events(proxy, task_id)[0][2]
    assert our_round is not None and _events(proxy, task_id)[1] == (906, f"r-{tag}", our_round)


def test_905_cuts_a_chinese_reply_whose_punctuation_changed(proxy: Proxy, upstream: Upstream, task_id: str) -> None:
    tag = marker()
    reply = "你好，世界！今天天气很好，我们去公园散步吧。"
    _chat(proxy, task_id, f"{tag} [[reply:{reply}]]")
    _post(proxy, _body(905, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "你好, 世界! 今天天气很好"}))
    [stored] = proxy.rounds(task_id)
    assert stored["messages"][-1]["content"] == "你好，世界！今天天气很好，"
    _chat(proxy, task_id, f"{tag} next")
    assert upstream.requests(f"{tag} next")[0]["messages"][2] == {"role": "assistant", "content": "你好，世界！今天天气很好，"}


def test_905_arriving_after_the_next_round_began_still_cuts_later_contexts(
    proxy: Proxy, upstream: Upstream, task_id: str
) -> None:
    tag = marker()
    _chat(proxy, task_id, f"{tag} first [[reply:{LONG_REPLY}]]")
    started = threading.Event()

    def second_round() -> None:
        stream = proxy.client().chat.completions.create(
            model="m", stream=True, extra_headers=headers(task_id),
            messages=[SYSTEM, {"role": "user", "content": f"{tag} second [[words:30]] [[delay:0.02]]"}],
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()

    worker = threading.Thread(target=second_round)
    worker.start()
    assert started.wait(10)
    _post(proxy, _body(905, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Hello there."}))
    worker.join(10)
    # The second round read its context before the 905; every later one holds the cut reply.
    assert upstream.requests(f"{tag} second")[0]["messages"][2]["content"] == LONG_REPLY
    _chat(proxy, task_id, f"{tag} third")
    third = upstream.requests(f"{tag} third")[0]["messages"]
    assert third[2] == {"role": "assistant", "content": "Hello there."}
    assert [r["seq"] for r in proxy.rounds(task_id)] == [1, 2, 3]


def test_905_matching_nothing_is_stored_and_logged(proxy: Proxy, task_id: str) -> None:
    tag = marker()
    _chat(proxy, task_id, f"{tag} [[reply:Something else entirely.]]")
    response = _post(proxy, _body(905, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Words nobody said."}))
    assert response.status_code == 200 and response.json() == {"code": 0}
    assert _events(proxy, task_id) == [(905, f"r-{tag}", None)]
    assert proxy.rounds(task_id)[0]["messages"][-1]["content"] == "Something else entirely."
    wait_until(lambda: "905 matches no recent round" in proxy.logs(), timeout=5, what="the log line")


# -- 903/905 that come while their round is still open -------------------------------------------


def _start_stream(server: Proxy, task_id: str, text: str, words_before: int) -> tuple[Any, str]:
    """A streamed round, read until `words_before` words came; returns the stream to go on with."""
    stream = server.client().chat.completions.create(
        model="m", stream=True, extra_headers=headers(task_id), messages=[SYSTEM, {"role": "user", "content": text}]
    )
    said = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            said += chunk.choices[0].delta.content
            if len(said.split()) >= words_before:
                break
    return stream, said


def _read_to_the_end(stream: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def _held(server: Proxy, task_id: str) -> list[int]:
    def fetch(conn: Connection) -> list[int]:
        query = select(CallbackEvent.event_type).where(CallbackEvent.task_id == task_id, CallbackEvent.held_since.is_not(None))
        return list(conn.execute(query).scalars())

    return run_db(server.database_url, fetch)


def _stored_round(server: Proxy, task_id: str) -> dict[str, Any]:
    [stored] = wait_until(lambda: server.rounds(task_id), timeout=10, what="the round stored")
    return stored


@pytest.mark.parametrize("client", ["reads-to-the-end", "leaves"])
def test_a_905_that_comes_while_its_round_streams_cuts_the_round_once_stored(
    proxy: Proxy, upstream: Upstream, task_id: str, client: str
) -> None:
    tag = marker()
    asked = f"{tag} [[words:80]] [[delay:0.02]]"
    stream, said = _start_stream(proxy, task_id, asked, words_before=6)
    response = _post(proxy, _body(905, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "w0 w1 w2 w3"}))
    assert response.status_code == 200 and response.json() == {"code": 0}
    assert _held(proxy, task_id) == [905] and _events(proxy, task_id) == [(905, f"r-{tag}", None)]
    if client == "leaves":
        stream.close()
    else:
        said += _read_to_the_end(stream)
        assert len(said.split()) == 80  # the stream itself is not cut short: the 905 is about the past
    # The round is stored, then the held 905 applied (before the task's next round may start).
    wait_until(lambda: _held(proxy, task_id) == [], timeout=10, what="the held 905 applied")
    stored = _stored_round(proxy, task_id)
    assert stored["status"] == "interrupted" and stored["messages"][-1] == {"role": "assistant", "content": "w0 w1 w2 w3"}
    assert _events(proxy, task_id) == [(905, f"r-{tag}", stored["id"])]
    _chat(proxy, task_id, f"{tag} next")
    assert upstream.requests(f"{tag} next")[0]["messages"][1:3] == [
        {"role": "user", "content": asked}, {"role": "assistant", "content": "w0 w1 w2 w3"},
    ]


def test_a_903_of_the_bots_reply_that_overtakes_its_round_names_it(proxy: Proxy, task_id: str) -> None:
    tag = marker()
    stream, _said = _start_stream(proxy, task_id, f"{tag} [[reply:{LONG_REPLY}]] [[delay:0.05]]", words_before=2)
    _post(proxy, _body(903, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": LONG_REPLY}))
    assert _held(proxy, task_id) == [903]
    assert _read_to_the_end(stream).endswith("nearby.")
    stored = _stored_round(proxy, task_id)
    wait_until(lambda: _events(proxy, task_id) == [(903, f"r-{tag}", stored["id"])], timeout=5, what="the 903 tied")
    assert stored["status"] == "completed"  # a 903 names the round; it cuts nothing


def test_a_905_reaching_one_process_cuts_the_round_another_streams(
    start_proxy, upstream: Upstream, migrated_url: str
) -> None:
    env = {"DATABASE_URL": migrated_url, "CALLBACK_SIGN_KEY": CALLBACK_KEY}
    one, two = start_proxy(env), start_proxy(env)
    tag = marker()
    task_id = f"task-{tag}"
    _chat(one, task_id, f"{tag} first")  # `one` holds the task's history in its copy
    stream, _said = _start_stream(one, task_id, f"{tag} second [[words:80]] [[delay:0.02]]", words_before=6)
    _post(two, _body(905, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "w0 w1 w2"}))
    assert _held(two, task_id) == [905]
    _read_to_the_end(stream)
    wait_until(lambda: _held(one, task_id) == [], timeout=10, what="the held 905 applied")
    assert one.rounds(task_id)[1]["messages"][-1] == {"role": "assistant", "content": "w0 w1 w2"}
    _chat(one, task_id, f"{tag} third")
    assert upstream.requests(f"{tag} third")[0]["messages"][4] == {"role": "assistant", "content": "w0 w1 w2"}


def test_a_held_event_whose_round_is_not_stored_in_time_stays_unmatched(start_proxy, migrated_url: str) -> None:
    server = start_proxy(
        {"DATABASE_URL": migrated_url, "CALLBACK_SIGN_KEY": CALLBACK_KEY, "CALLBACK_HOLD_S": "0.3"}, in_process=True
    )
    tag = marker()
    task_id = f"task-{tag}"
    stream, _said = _start_stream(server, task_id, f"{tag} [[words:150]] [[delay:0.02]]", words_before=3)
    _post(server, _body(905, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "w0 w1"}))
    # The wait ends while the round still streams: the event is kept, tied to nothing.
    wait_until(lambda: _held(server, task_id) == [], timeout=10, what="the wait over")
    assert server.rounds(task_id) == []
    assert len(_read_to_the_end(stream).split()) > 100
    stored = _stored_round(server, task_id)
    assert stored["status"] == "completed" and len(stored["messages"][-1]["content"].split()) == 150
    assert _events(server, task_id) == [(905, f"r-{tag}", None)]


# -- 902 ends a task, 906 `interruption` marks a round -----------------------------------------


def _admin_task(server: Proxy, task_id: str) -> dict[str, Any]:
    return httpx.get(server.url + f"/admin/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()


def test_a_902_ends_the_task_and_a_later_round_opens_it_again(proxy: Proxy, upstream: Upstream, task_id: str) -> None:
    tag = marker()
    _chat(proxy, task_id, f"{tag} one")
    ended_ms = 1_790_000_000_000
    _post(proxy, _body(902, task_id, {"LeaveCode": 99}, event_ms=ended_ms))
    task = _admin_task(proxy, task_id)
    assert (task["ended_at"], task["leave_code"]) == ("2026-09-21T14:13:20+00:00", 99)
    _chat(proxy, task_id, f"{tag} two")  # the user came back: the same task goes on, history and all
    task = _admin_task(proxy, task_id)
    assert (task["ended_at"], task["leave_code"]) == (None, None)
    assert upstream.requests(f"{tag} two")[0]["messages"][1]["content"] == f"{tag} one"


@pytest.mark.parametrize("order", ["named-first", "interruption-first"])
def test_a_906_interruption_marks_its_round_without_a_905(proxy: Proxy, task_id: str, order: str) -> None:
    tag = marker()
    reply = _chat(proxy, task_id, f"{tag} [[reply:{LONG_REPLY}]]")
    named = _body(903, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": reply})
    interruption = _body(906, task_id, {"Metric": "interruption", "Value": 1, "Tag": {"RoundId": f"r-{tag}"}})
    for event in ([named, interruption] if order == "named-first" else [interruption, named]):
        assert _post(proxy, event).json() == {"code": 0}
    [stored] = proxy.rounds(task_id)
    assert stored["interrupted"] and stored["messages"][-1]["content"] == LONG_REPLY  # only a 905 says what was heard
    round_id = stored["id"]
    assert {(t, r) for t, r, _o in _events(proxy, task_id)} == {(903, f"r-{tag}"), (906, f"r-{tag}")}
    assert [o for _t, _r, o in _events(proxy, task_id)].count(round_id) >= 1


def _metric(server: Proxy, line_start: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def test_the_orchestrators_metrics_are_on_metrics(proxy: Proxy) -> None:
    task_id = f"metrics-{uuid.uuid4().hex[:8]}"
    count = _metric(proxy, "trtc_orchestrator_llm_first_token_seconds_count")
    total = _metric(proxy, "trtc_orchestrator_llm_first_token_seconds_sum")
    discontinuities = _metric(proxy, "trtc_orchestrator_tts_discontinuity_total")
    _post(proxy, _body(906, task_id, {"Metric": "llm_first_token", "Value": 850, "Tag": {"RoundId": "x"}}))
    _post(proxy, _body(906, task_id, {"Metric": "tts_discontinuity", "Value": 1, "Tag": {"RoundId": "x"}}))
    _post(proxy, _body(908, task_id, {"Metric": "llm_error", "Tag": {"RoundId": "x", "Code": 30200, "Message": "t"}}))
    assert _metric(proxy, "trtc_orchestrator_llm_first_token_seconds_count") == count + 1
    assert _metric(proxy, "trtc_orchestrator_llm_first_token_seconds_sum") == pytest.approx(total + 0.85)
    assert _metric(proxy, "trtc_orchestrator_tts_discontinuity_total") == discontinuities + 1
    assert _metric(proxy, 'trtc_orchestrator_errors_total{code="30200",metric="llm_error"}') >= 1
    # The proxy's own time to first token stands beside it.
    assert "trtc_llm_first_token_seconds_count" in httpx.get(proxy.url + "/metrics").text


def test_a_body_that_is_not_an_event_is_a_clear_error(proxy: Proxy) -> None:
    response = _post(proxy, b"{not json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = _post(proxy, json.dumps({"EventInfo": {}}).encode())
    assert response.status_code == 400 and "EventType" in response.json()["error"]["message"]



def test_a_905_received_by_one_process_reaches_the_history_copy_of_another(
    start_proxy, upstream: Upstream, migrated_url: str
) -> None:
    one = start_proxy({"DATABASE_URL": migrated_url, "CALLBACK_SIGN_KEY": CALLBACK_KEY})
    two = start_proxy({"DATABASE_URL": migrated_url, "CALLBACK_SIGN_KEY": CALLBACK_KEY})
    tag = marker()
    task_id = f"task-{tag}"
    _chat(one, task_id, f"{tag} first [[reply:{LONG_REPLY}]]")
    _chat(one, task_id, f"{tag} second")  # `one` now holds the task's history in its copy
    _post(two, _body(905, task_id, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Hello there. I can"}))
    _chat(one, task_id, f"{tag} third")
    assert upstream.requests(f"{tag} third")[0]["messages"][2] == {"role": "assistant", "content": "Hello there. I can"}
