"""`trtc-backend validate`: drive an LLM endpoint and a TTS endpoint (this project's or anyone's)
the way the orchestrator does, and report every protocol requirement as passed or failed, with
the reason, before a team calls `StartAIConversation`.

Per round: an LLM request with the TRTC headers and a system prompt, its SSE parsed strictly
(`data:` lines of chat.completion.chunk JSON, ending with `data: [DONE]`), the first token timed
against the orchestrator's `Timeout`; the same request again with the same request id (a
retry); the reply cut into sentences as the orchestrator cuts it, one TTS request per sentence,
each checked for the exact `Content-Type` and chunked transfer, its audio played out on a
simulated clock to count `tts_discontinuity`. Once: a TTS error checked for the protocol's JSON
shape. Optionally an interruption: after `--interrupt-ms` of playback a signed 905 with the text
played so far goes to the callback URL, and one more round follows.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import httpx

from orchestrator.protocol import HEARD, TRANSCRIPT, sign

_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s*|\n+")
QUESTIONS = [
    "Hello! Can you introduce yourself in two sentences?",
    "What is a good way to relax after work? Answer briefly.",
    "Thanks. Can you say that again, shorter?",
    "Tell me one fun fact about the ocean.",
]
_CONTENT_TYPES = {"pcm": "audio/L16", "wav": "audio/wav"}


@dataclass
class Options:
    llm_url: str
    llm_key: str
    model: str = "gpt-4o-mini"
    tts_url: str | None = None
    tts_key: str | None = None
    rounds: int = 2
    timeout_s: float = 3.0
    interrupt_ms: int | None = None
    callback_url: str | None = None
    callback_key: str | None = None
    history: int = 0
    audio_format: str = "pcm"
    sample_rate: int = 16000
    channels: int = 1
    system_prompt: str = "You are a friendly voice assistant. Answer in one or two short sentences."


# Where a requirement comes from: the TRTC documentation says it, or it is this project's reading
# of what the documentation leaves open (PROTOCOL.md, "Not documented"), to confirm live.
DOCUMENTED, INFERRED = "documented", "inferred"


@dataclass
class Check:
    requirement: str
    ok: bool
    detail: str = ""
    basis: str = DOCUMENTED


@dataclass
class RoundMetrics:
    round: int
    llm_first_token_ms: float | None = None
    tts_first_frame_latency_ms: float | None = None
    tts_discontinuity: int = 0
    reply: str = ""


@dataclass
class Report:
    task_id: str
    checks: list[Check] = field(default_factory=list)
    rounds: list[RoundMetrics] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def check(self, requirement: str, ok: bool, detail: str = "", basis: str = DOCUMENTED) -> bool:
        self.checks.append(Check(requirement, ok, detail, basis))
        return ok

    def as_json(self) -> str:
        return json.dumps({"ok": self.ok, "task_id": self.task_id, "checks": [asdict(c) for c in self.checks],
                           "rounds": [asdict(r) for r in self.rounds]}, ensure_ascii=False, indent=2)

    def as_text(self) -> str:
        width = max(len(c.requirement) for c in self.checks) if self.checks else 10
        lines = [f"{'requirement'.ljust(width)}  result  basis       detail"]
        lines += [
            f"{c.requirement.ljust(width)}  {'pass' if c.ok else 'FAIL'}    {c.basis.ljust(10)}  {c.detail}" for c in self.checks
        ]
        lines += ["", "round  llm_first_token  tts_first_frame_latency  tts_discontinuity"]
        lines += [
            f"{r.round:>5}  {_ms(r.llm_first_token_ms):>15}  {_ms(r.tts_first_frame_latency_ms):>23}  {r.tts_discontinuity:>17}"
            for r in self.rounds
        ]
        lines += ["", f"task {self.task_id}: " + ("all requirements met" if self.ok else f"{sum(not c.ok for c in self.checks)} requirement(s) failed")]
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def sentences(text: str) -> list[str]:
    """The reply cut as the orchestrator cuts it for TTS: at sentence ends and line breaks."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part and part.strip()]


@dataclass
class _Stream:
    text: str = ""
    first_token_s: float | None = None
    problem: str | None = None


@dataclass
class _Speech:
    sentence: str
    first_byte_s: float  # since the TTS request was sent
    arrived_at: float  # on the run's clock
    seconds: float


class Validator:
    def __init__(self, options: Options, http: httpx.AsyncClient, progress: Callable[[str], None] = lambda _line: None) -> None:
        self.options = options
        self.http = http
        self.progress = progress
        self.task_id = f"validate-{uuid.uuid4().hex[:12]}"
        self.report = Report(self.task_id)

    def _headers(self, key: str | None, request_id: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {key}" if key else "",
            "X-Task-Id": self.task_id,
            "X-Request-Id": request_id,
            "X-Sdk-App-Id": "1400000000",
            "X-User-Id": "validator-user",
            "X-Room-Id": "validator-room",
            "X-Room-Id-Type": "1",
        }

    async def run(self) -> Report:
        history: list[dict[str, str]] = []
        for n in range(1, self.options.rounds + 1):
            metrics = RoundMetrics(n)
            self.report.rounds.append(metrics)
            question = QUESTIONS[(n - 1) % len(QUESTIONS)]
            stream = await self._llm_round(n, question, history, metrics)
            if stream is None:
                break
            if self.options.tts_url:
                speech = await self._speak(n, stream.text, metrics)
                if n == 1 and self.options.interrupt_ms and self.options.callback_url and speech:
                    await self._interrupt(stream.text, speech)
            if self.options.history:
                history += [{"role": "user", "content": question}, {"role": "assistant", "content": stream.text}]
                history = history[-2 * self.options.history :]
            self.progress(
                f"round {n}: first token {_ms(metrics.llm_first_token_ms)}, first audio "
                f"{_ms(metrics.tts_first_frame_latency_ms)}, {metrics.tts_discontinuity} discontinuities"
            )
        if self.options.tts_url:
            await self._tts_error_shape()
        return self.report

    # -- LLM --------------------------------------------------------------------------------

    async def _llm_round(self, n: int, question: str, history: list[dict[str, str]], metrics: RoundMetrics) -> _Stream | None:
        request_id = uuid.uuid4().hex
        body = {
            "model": self.options.model,
            "stream": True,
            "messages": [{"role": "system", "content": self.options.system_prompt}, *history, {"role": "user", "content": question}],
        }
        stream = await self._stream(body, request_id)
        ok = self.report.check(f"round {n}: LLM streams SSE to [DONE]", stream.problem is None, stream.problem or f"{len(stream.text)} characters")
        if not ok:
            return None
        metrics.reply = stream.text
        first = stream.first_token_s
        metrics.llm_first_token_ms = None if first is None else first * 1000
        # The documentation gives Timeout (1-50 s, default 3) but not what it bounds: the first
        # token is this project's reading.
        self.report.check(
            f"round {n}: LLM first token within Timeout {self.options.timeout_s:g} s",
            first is not None and first <= self.options.timeout_s,
            "no text at all" if first is None else f"{first * 1000:.0f} ms",
            INFERRED,
        )
        retry = await self._stream(body, request_id)
        same = "the same reply" if retry.text == stream.text else "a different reply"
        self.report.check(
            f"round {n}: a retry with the same X-Request-Id is answered",
            retry.problem is None,
            retry.problem or f"{same} ({len(retry.text)} characters)",
        )
        return stream

    async def _stream(self, body: dict[str, Any], request_id: str) -> _Stream:
        out = _Stream()
        started = time.perf_counter()
        headers = self._headers(self.options.llm_key, request_id)
        try:
            async with self.http.stream("POST", self.options.llm_url, json=body, headers=headers,
                                        timeout=httpx.Timeout(self.options.timeout_s + 30)) as response:
                if response.status_code != 200:
                    raw = (await response.aread())[:300]
                    out.problem = f"HTTP {response.status_code}: {raw.decode(errors='replace')}"
                    return out
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    out.problem = f"Content-Type {content_type!r}; a streamed reply must be text/event-stream (SSE)"
                    await response.aread()
                    return out
                parts: list[str] = []
                done = False
                async for line in response.aiter_lines():
                    if not line.strip() or line.startswith(":"):
                        continue
                    if done:
                        out.problem = f"data after [DONE]: {line[:80]!r}"
                        return out
                    if not line.startswith("data:"):
                        out.problem = f"not an SSE data line: {line[:80]!r}"
                        return out
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        continue
                    try:
                        chunk = json.loads(payload)
                        delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        out.problem = f"not a chat.completion.chunk ({type(exc).__name__}): {payload[:80]!r}"
                        return out
                    if chunk.get("error"):
                        out.problem = f"error event: {chunk['error']}"
                        return out
                    if delta.get("content"):
                        if out.first_token_s is None:
                            out.first_token_s = time.perf_counter() - started
                        parts.append(delta["content"])
                out.text = "".join(parts)
                if not done:
                    out.problem = "the stream ended without data: [DONE]"
        except httpx.HTTPError as exc:
            out.problem = f"{type(exc).__name__}: {exc}"
        return out

    # -- TTS --------------------------------------------------------------------------------

    async def _speak(self, n: int, reply: str, metrics: RoundMetrics) -> list[_Speech]:
        spoken: list[_Speech] = []
        problems: list[str] = []
        clock_start = time.perf_counter()
        for sentence in sentences(reply) or [reply]:
            speech, problem = await self._tts(sentence, clock_start)
            if problem:
                problems.append(problem)
                break
            assert speech is not None
            spoken.append(speech)
        self.report.check(
            f"round {n}: TTS answers every sentence as the orchestrator requires",
            not problems,
            problems[0] if problems else f"{len(spoken)} sentence(s), {sum(s.seconds for s in spoken):.1f} s of audio",
        )
        if spoken:
            metrics.tts_first_frame_latency_ms = spoken[0].first_byte_s * 1000
            metrics.tts_discontinuity = _discontinuities(spoken)
        return spoken

    async def _tts(self, text: str, clock_start: float) -> tuple[_Speech | None, str | None]:
        options = self.options
        body = {"Text": text, "Format": options.audio_format, "SampleRate": options.sample_rate, "Channel": options.channels}
        headers = {**self._headers(options.tts_key, uuid.uuid4().hex), "Content-Type": "application/json;charset=UTF-8"}
        started = time.perf_counter()
        assert options.tts_url is not None
        try:
            async with self.http.stream("POST", options.tts_url, json=body, headers=headers, timeout=30) as response:
                if response.status_code != 200:
                    raw = (await response.aread())[:300]
                    return None, f"HTTP {response.status_code} for {text[:30]!r}: {raw.decode(errors='replace')}"
                content_type = response.headers.get("content-type", "")
                wanted = _CONTENT_TYPES[options.audio_format]
                if content_type.split(";")[0].strip() != wanted:
                    return None, f"TTS answered Content-Type {content_type}; the orchestrator accepts exactly {wanted}"
                if response.headers.get("transfer-encoding", "").lower() != "chunked" or "content-length" in response.headers:
                    return None, (
                        "TTS answered without Transfer-Encoding: chunked "
                        f"(Content-Length {response.headers.get('content-length')}); the orchestrator requires chunked"
                    )
                audio = b""
                first: float | None = None
                async for chunk in response.aiter_bytes():
                    if chunk and first is None:
                        first = time.perf_counter()
                    audio += chunk
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if options.audio_format == "wav":
            if audio[:4] != b"RIFF" or audio[8:12] != b"WAVE":
                return None, "the wav body does not start with a RIFF/WAVE header"
            audio = audio[44:]
        if first is None or not audio:
            return None, f"no audio for {text[:30]!r}"
        seconds = len(audio) / (options.sample_rate * options.channels * 2)
        return _Speech(text, first - started, first - clock_start, seconds), None

    async def _tts_error_shape(self) -> None:
        options = self.options
        assert options.tts_url is not None
        headers = {**self._headers(options.tts_key, uuid.uuid4().hex), "Content-Type": "application/json;charset=UTF-8"}
        try:
            response = await self.http.post(options.tts_url, json={"Format": options.audio_format}, headers=headers, timeout=10)
        except httpx.HTTPError as exc:
            self.report.check("TTS errors are JSON {\"error\": {\"code\", \"message\"}}", False, f"{type(exc).__name__}: {exc}")
            return
        detail = f"HTTP {response.status_code}, {response.headers.get('content-type')}: {response.text[:120]}"
        try:
            error = response.json()["error"]
            ok = 400 <= response.status_code < 500 and isinstance(error["code"], str) and isinstance(error["message"], str)
        except (ValueError, KeyError, TypeError):
            ok = False
        ok = ok and response.headers.get("content-type", "").startswith("application/json")
        self.report.check("TTS errors are JSON {\"error\": {\"code\", \"message\"}}", ok, detail)

    # -- interruption -----------------------------------------------------------------------

    async def _interrupt(self, reply: str, spoken: list[_Speech]) -> None:
        """The user interrupts after `interrupt_ms` of playback. As the orchestrator does, a 903
        with the whole reply and the round's RoundId, then a 905 with the text played so far."""
        options = self.options
        assert options.callback_url and options.interrupt_ms is not None
        round_id = f"{self.task_id}-1"
        heard = _played_text(spoken, options.interrupt_ms / 1000)
        for event_type, text in ((TRANSCRIPT, reply), (HEARD, heard)):
            answered, detail = await self._callback(event_type, {"UserId": "validator-bot", "RoundId": round_id, "Text": text})
            if event_type == HEARD:
                detail += f"; heard {heard!r} of {reply!r}"
            self.report.check(f"a signed {event_type} is answered 200 {{\"code\": 0}} within 5 s", answered, detail)

    async def _callback(self, event_type: int, payload: dict[str, Any]) -> tuple[bool, str]:
        options = self.options
        assert options.callback_url is not None
        now = int(time.time() * 1000)
        body = json.dumps({
            "EventGroupId": 9, "EventType": event_type, "CallbackTs": now,
            "EventInfo": {"EventMsTs": now, "TaskId": self.task_id, "RoomId": "validator-room", "RoomIdType": 1,
                          "Payload": payload},
        }, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "Sign": sign(options.callback_key or "", body), "SdkAppId": "1400000000"}
        started = time.perf_counter()
        try:
            response = await self.http.post(options.callback_url, content=body, headers=headers, timeout=5)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}"
        answered = response.status_code == 200 and response.headers.get("content-type", "").startswith("application/json")
        answered = answered and response.content.strip() != b"" and _json_or_none(response) == {"code": 0}
        return answered, f"HTTP {response.status_code} {response.text[:80]} in {(time.perf_counter() - started) * 1000:.0f} ms"


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _discontinuities(spoken: list[_Speech]) -> int:
    """Played back to back from the first audio on: a sentence whose audio arrived after the one
    before it finished playing is a gap the listener hears."""
    count = 0
    playing_until = spoken[0].arrived_at + spoken[0].seconds
    for speech in spoken[1:]:
        if speech.arrived_at > playing_until:
            count += 1
        playing_until = max(playing_until, speech.arrived_at) + speech.seconds
    return count


def _played_text(spoken: list[_Speech], seconds: float) -> str:
    """The text played in the first `seconds` of playback: whole sentences, then the words of
    the one playing in proportion to its time played."""
    said: list[str] = []
    elapsed = 0.0
    for speech in spoken:
        if elapsed + speech.seconds <= seconds:
            said.append(speech.sentence)
            elapsed += speech.seconds
            continue
        # The word (or CJK character) being spoken counts as heard.
        words = speech.sentence.split(" ")
        share = max(0.0, seconds - elapsed) / speech.seconds if speech.seconds else 0.0
        if len(words) > 1:
            said.append(" ".join(words[: math.ceil(len(words) * share)]))
        else:
            said.append(speech.sentence[: math.ceil(len(speech.sentence) * share)])
        break
    return " ".join(part for part in said if part)
