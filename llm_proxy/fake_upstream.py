"""A fake OpenAI-compatible upstream: for the tests, the benchmark and trying the stack offline.

It answers `/v1/chat/completions` (streaming or not) and `/v1/models`. What it does is steered
by directives in the last user message (or in the model name), so a test scripts the upstream
through the proxy:

- `[[reply:some text]]`: answer exactly this text (one chunk per word); default "You said: ...";
  `[[reply64:BASE64]]` the same for text with brackets (URL-safe base64 of UTF-8)
- `[[words:N]]`: answer N numbered words
- `[[first_delay:S]]`, `[[delay:S]]`: seconds before the first chunk, between chunks
- `[[status:N]]`: fail with HTTP status N (429, 500, ...) in OpenAI's error shape
- `[[fail_after:N]]`: send N chunks, then an error event mid-stream
- `[[no_tools:1]]`: refuse a request that carries `tools` with a 400, as many local servers do
- `[[think:TEXT]]`: put `<think>TEXT</think>` before the reply, as reasoning models do;
  `[[reasoning:TEXT]]`: send TEXT as `reasoning_content` deltas first; `[[chunk_chars:N]]`: cut
  the reply into chunks of N characters instead of words
- `[[tool:NAME:ARGS]]` (repeatable): call these tools (ARGS as JSON; streamed in fragments the
  way real models do), with `[[say:TEXT]]` streamed first; once results follow the user message
  it answers "Results: ..." with them, unless `[[tool_loop:1]]` makes it call again (and again);
  `tool_choice: none` gets text, unless `[[ignore_tool_choice:1]]` (as some local servers do)
- `[[content_type:TYPE]]`: answer 200 with an HTML page of this type; `[[null_choices:1]]`:
  stream chunks with `"choices": null` (two ways of a 200 that is no answer)
- `[[strict:1]]`: refuse a body with a field that is no OpenAI parameter with a 400, as OpenAI's
  own API does
- `[[summarize:1]]` (in the model name): answer with every line of the last message that starts
  with `User: `, once each, in order: a summarizer that forgets nothing the user said

`/v1/embeddings` answers every input with a deterministic vector (hashed character bigrams and
words, `EMBEDDING_DIMENSIONS` of them), so texts that share words are near; `[[status:N]]` and
`[[delay:S]]` in the `model` name make it fail or wait.

`/v1/audio/speech` is a fake speech engine (OpenAI's speech API): a sine of `[[hz:F]]` (440) at
`[[rate:R]]` (24000) Hz, 0.05 s per character of `input`, as `pcm` (s16le) or `wav`, streamed in
0.1 s chunks; `[[status:N]]`, `[[first_delay:S]]`, `[[die_after:N]]` (N chunks, then the
connection drops) and `[[endless:1]]` in the `model` name script it.

Every request is recorded (`GET /_requests`), and so is every stream its client abandoned
(`GET /_abandoned`), which is how tests see that the proxy stopped paying for tokens. `/_echo`
answers any GET or POST with what it received, and `/_fail` with a 500: targets for HTTP tools.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import struct
import time
import zlib
from collections import deque
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_proxy.protocol import OPENAI_PARAMETERS

_DIRECTIVE = re.compile(r"\[\[(\w+):([^\]]*)\]\]")
EMBEDDING_DIMENSIONS = 256
_EMBED_TERMS = re.compile(r"[a-z0-9]+|[^\W\d_a-z]", re.IGNORECASE)


def fake_embedding(text: str) -> list[float]:
    """A deterministic bag-of-terms vector: words, single characters and character pairs
    hashed into `EMBEDDING_DIMENSIONS` buckets, normalized."""
    vector = [0.0] * EMBEDDING_DIMENSIONS
    terms = _EMBED_TERMS.findall(text.lower())
    for term in [*terms, *(a + b for a, b in zip(terms, terms[1:]))]:
        vector[zlib.crc32(term.encode()) % EMBEDDING_DIMENSIONS] += 1.0
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vector]


def _last_user(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The last user message's text, and the messages after it."""
    messages = body.get("messages", [])
    index = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    content = messages[index].get("content") or "" if index >= 0 else ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    return content, messages[index + 1 :]


def _directives(body: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The last user message's directives, and those in the model name (which win: a profile's
    upstreams differ by model, so a test can make one fail and another answer)."""
    content, _after = _last_user(body)
    directives = dict(_DIRECTIVE.findall(content))
    directives.update(_DIRECTIVE.findall(str(body.get("model", ""))))
    return directives, _DIRECTIVE.sub("", content).strip()


def _tool_calls(body: dict[str, Any], directives: dict[str, str]) -> list[dict[str, Any]]:
    """The calls this turn makes: none once tool results came back (unless `tool_loop`), or
    when tools are off (`tool_choice: none`)."""
    content, after = _last_user(body)
    if body.get("tool_choice") == "none" and "ignore_tool_choice" not in directives:
        return []
    if any(m.get("role") == "tool" for m in after) and "tool_loop" not in directives:
        return []
    step = sum(1 for m in after if m.get("role") == "assistant")
    calls = []
    for n, (key, value) in enumerate(_DIRECTIVE.findall(content)):
        if key == "tool":
            name, _, arguments = value.partition(":")
            calls.append({"id": f"call_{step}_{n}", "name": name, "arguments": arguments or "{}"})
    return calls


def _reply_words(directives: dict[str, str], said: str, body: dict[str, Any], calls: list[dict[str, Any]]) -> list[str]:
    _content, after = _last_user(body)
    results = [str(m.get("content")) for m in after if m.get("role") == "tool"]
    if calls:
        text = directives.get("say", "")
        if not text:
            return []
    elif results:
        text = "Results: " + " | ".join(results)
    elif "reply" in directives:
        text = directives["reply"]
    elif "reply64" in directives:
        text = base64.urlsafe_b64decode(directives["reply64"]).decode()
    elif "words" in directives:
        text = " ".join(f"w{i}" for i in range(int(directives["words"])))
    elif "summarize" in directives:
        lines = [line for line in str(_content or "").splitlines() if line.startswith("User: ")]
        text = "\n".join(dict.fromkeys(lines))
    else:
        text = f"You said: {said}"
    if "think" in directives:
        text = f"<think>{directives['think']}</think>\n\n{text}"
    if "chunk_chars" in directives:
        size = int(directives["chunk_chars"])
        return [text[start : start + size] for start in range(0, len(text), size)]
    words = text.split(" ")
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


# What OpenAI's chat completions take (`[[strict:1]]`).
_OPENAI_FIELDS = OPENAI_PARAMETERS | {"model", "messages", "stream", "stream_options", "n", "tools"}


def _error(status: int, message: str) -> JSONResponse:
    kind = "rate_limit_error" if status == 429 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": str(status)}}, status_code=status)


def create_fake_upstream(*, record: bool = True) -> Starlette:
    requests: deque[dict[str, Any]] = deque(maxlen=10_000)
    abandoned: deque[dict[str, Any]] = deque(maxlen=10_000)

    async def chat(request: Request) -> Response:
        body = await request.json()
        directives, said = _directives(body)
        if record:
            requests.append({"headers": dict(request.headers), "body": body, "ts": time.time()})
        if "status" in directives:
            return _error(int(directives["status"]), f"fake upstream failure {directives['status']}")
        if "content_type" in directives:
            return Response("<html><body>Sign in</body></html>", media_type=directives["content_type"])
        unknown = sorted(set(body) - _OPENAI_FIELDS)
        if "strict" in directives and unknown:
            return _error(400, f"Unrecognized request argument supplied: {unknown[0]}")
        if "no_tools" in directives and body.get("tools"):
            # What several local model servers answer a request with `tools`.
            return _error(400, f"model {body.get('model')!r} does not support tools")
        calls = _tool_calls(body, directives)
        words = _reply_words(directives, said, body, calls)
        model = body.get("model", "fake")
        if not body.get("stream"):
            await asyncio.sleep(float(directives.get("first_delay", 0)))
            message: dict[str, Any] = {"role": "assistant", "content": "".join(words)}
            if calls:
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls
                ]
            return JSONResponse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": len(words), "total_tokens": 10 + len(words)},
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _stream(words, model, directives, include_usage, said, abandoned, calls),
            media_type="text/event-stream",
        )

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        directives = dict(_DIRECTIVE.findall(str(body.get("model", ""))))
        if record:
            requests.append({"headers": dict(request.headers), "body": body, "ts": time.time()})
        await asyncio.sleep(float(directives.get("delay", 0)))
        if "status" in directives:
            return _error(int(directives["status"]), f"fake upstream failure {directives['status']}")
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        return JSONResponse({
            "object": "list",
            "model": body.get("model", "fake"),
            "data": [{"object": "embedding", "index": i, "embedding": fake_embedding(str(t))} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": sum(len(str(t)) for t in texts), "total_tokens": sum(len(str(t)) for t in texts)},
        })

    async def speech(request: Request) -> Response:
        body = await request.json()
        directives = dict(_DIRECTIVE.findall(str(body.get("model", ""))))
        if record:
            requests.append({"headers": dict(request.headers), "body": body, "ts": time.time()})
        if "status" in directives:
            return _error(int(directives["status"]), f"fake engine failure {directives['status']}")
        return StreamingResponse(_sine(body, directives), media_type="audio/wav" if body.get("response_format") == "wav" else "audio/pcm")

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse(
            {
                "method": request.method,
                "query": dict(request.query_params),
                "json": json.loads(body) if body else None,
                "authorization": request.headers.get("authorization"),
            }
        )

    async def fail(_request: Request) -> JSONResponse:
        return JSONResponse({"detail": "broken on purpose"}, status_code=500)

    async def list_requests(request: Request) -> JSONResponse:
        """Every recorded request, or with `?marker=` those whose last message contains it (a
        test's own, without sending the whole session's log)."""
        marker = request.query_params.get("marker")
        if marker is None:
            return JSONResponse(list(requests))
        return JSONResponse([r for r in requests if marker in str(((r["body"].get("messages") or [{}])[-1]).get("content"))])

    async def list_abandoned(_request: Request) -> JSONResponse:
        return JSONResponse(list(abandoned))

    async def models(_request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/audio/speech", speech, methods=["POST"]),
            Route("/_requests", list_requests),
            Route("/_abandoned", list_abandoned),
            Route("/_echo", echo, methods=["GET", "POST"]),
            Route("/_fail", fail, methods=["GET", "POST"]),
        ]
    )


async def _stream(
    words: list[str],
    model: str,
    directives: dict[str, str],
    include_usage: bool,
    said: str,
    abandoned: deque[dict[str, Any]],
    calls: list[dict[str, Any]],
) -> AsyncIterator[str]:
    head = json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model})[:-1]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        if "null_choices" in directives:
            return f'data: {head}, "choices": null}}\n\n'
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f'data: {head}, "choices": [{json.dumps(choice)}]}}\n\n'

    delay = float(directives.get("delay", 0))
    fail_after = int(directives["fail_after"]) if "fail_after" in directives else None
    sent = 0
    finished = False
    try:
        await asyncio.sleep(float(directives.get("first_delay", 0)))
        yield chunk({"role": "assistant", "content": ""})
        for thought in directives.get("reasoning", "").split():
            yield chunk({"reasoning_content": thought + " "})
        for word in words:
            if fail_after is not None and sent >= fail_after:
                yield 'data: {"error": {"message": "fake upstream broke mid-stream", "type": "server_error", "code": "500"}}\n\n'
                finished = True
                return
            if delay and sent:
                await asyncio.sleep(delay)
            yield chunk({"content": word})
            sent += 1
        for index, call in enumerate(calls):
            yield chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                          "function": {"name": call["name"], "arguments": ""}}]})
            arguments = call["arguments"]
            third = max(1, len(arguments) // 3)
            for start in range(0, len(arguments), third):
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments[start:start + third]}}]})
        yield chunk({}, "tool_calls" if calls else "stop")
        if include_usage:
            usage = {"prompt_tokens": 10, "completion_tokens": len(words), "total_tokens": 10 + len(words)}
            yield f'data: {head}, "choices": [], "usage": {json.dumps(usage)}}}\n\n'
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            abandoned.append({"said": said, "sent": sent, "of": len(words), "ts": time.time()})


async def _sine(body: dict[str, Any], directives: dict[str, str]) -> AsyncIterator[bytes]:
    """The fake engine's speech: a sine, 0.05 s a character, in 0.1 s chunks."""
    rate, hz = int(directives.get("rate", 24000)), float(directives.get("hz", 440))
    await asyncio.sleep(float(directives.get("first_delay", 0)))
    frames = max(int(rate * 0.2), int(rate * 0.05 * len(str(body.get("input", "")))))
    if body.get("response_format") == "wav":
        size = frames * 2
        yield (b"RIFF" + (36 + size).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
               + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little")
               + (rate * 2).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
               + b"data" + size.to_bytes(4, "little"))
    step = rate // 10
    sent = 0
    chunk = 0
    while sent < frames or "endless" in directives:
        if "die_after" in directives and chunk >= int(directives["die_after"]):
            raise ConnectionAbortedError("the fake engine died mid-stream")
        count = step if "endless" in directives else min(step, frames - sent)
        samples = [round(16000 * math.sin(2 * math.pi * hz * (sent + i) / rate)) for i in range(count)]
        yield struct.pack(f"<{count}h", *samples)
        sent += count
        chunk += 1
        await asyncio.sleep(0)
