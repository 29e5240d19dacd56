"""The real model, called through one long-lived langchain-openai `ChatOpenAI`.

The proxy only ever streams from the upstream (also for non-streaming clients): it sees the first
token as early as possible and can stop paying for tokens the moment its client goes away.

ChatOpenAI builds the request and turns the streamed chunks into messages; the HTTP transport
under it is `RawChatCompletions`, handed in as its `async_client`. ChatOpenAI takes plain dict
chunks as well as SDK objects, and the openai SDK's own transport cost more than the rest of the
proxy together: a recursive transform of every request parameter (~15 ms for a 50-round history)
and a pydantic model built per chunk, which ChatOpenAI at once dumps back to a dict. The HTTP
client is aiohttp: per streamed request it costs 0.35 ms of CPU where httpx (the SDK's) costs
1.2 ms, measured against the benchmark's upstream on this project's 2-core machine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, cast

import aiohttp
import orjson
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from core.errors import ApiError
from llm_proxy.context import StoredHistory, StoredRound, as_langchain, history_messages

# The model name ChatOpenAI is built with; every request names its own model.
_PLACEHOLDER_MODEL = "upstream-default"
_JSON = {"Content-Type": "application/json"}
log = logging.getLogger("trtc.upstream")


@dataclass(frozen=True, slots=True)
class CallFragment:
    """A piece of a streamed tool call: the first piece of a call has its id and name, the
    arguments arrive in pieces; `index` says which call of the turn it belongs to."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    calls: tuple[CallFragment, ...] = ()


class RawChatCompletions:
    """The part of the openai SDK's `chat.completions` resource that ChatOpenAI streams with:
    `await create(**payload)` returning an async context manager that yields chunk dicts."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self._http = http
        self._url = base_url + "chat/completions"

    async def create(self, **payload: Any) -> _ChunkStream:
        extra = payload.pop("extra_body", None) or {}
        body = _encode({**payload, **extra})
        try:
            response = await self._http.post(self._url, data=body, headers=_JSON)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(exc) from exc
        if response.status != 200:
            error = await _status_error(response, tools=len(payload.get("tools") or []))
            response.release()
            raise error
        if response.content_type != "text/event-stream":
            # A login page, a proxy's error page, a body of another API: not a chat completion stream.
            log.warning("upstream answered 200 with Content-Type %r", response.content_type)
            response.close()
            raise ApiError(
                502, f"Upstream answered with {response.content_type!r}, not a chat completion stream.",
                "upstream_error", "upstream_invalid",
            )
        return _ChunkStream(response)


def _encode(body: dict[str, Any]) -> bytes:
    """The request body. orjson encodes a 50-round history in a fifth of the standard library's
    time; what it refuses (integers beyond 64 bits in a passed-through field) the latter takes."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class _ChunkStream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aenter__(self) -> _ChunkStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        # Read to its end, the connection goes back to the pool; cut short, it is closed, which
        # is what stops the upstream generating.
        self._response.release()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        """The chunks of each network read, text-only neighbours merged (`coalesce`). Reads on
        to the body's end even after [DONE]: a response closed before its end takes its
        connection with it, and the next request pays for a new one."""
        pending = b""
        done = False
        async for data in self._response.content.iter_any():
            *lines, pending = (pending + data).split(b"\n")
            batch = []
            failure = None
            for line in lines:
                if done or not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                chunk = orjson.loads(payload)
                if chunk.get("error"):
                    failure = chunk["error"]
                    break
                batch.append(chunk)
            for chunk in coalesce(batch):
                yield chunk
            if failure is not None:
                message = failure.get("message") if isinstance(failure, dict) else str(failure)
                raise ApiError(502, f"Upstream failed mid-stream: {message}", "upstream_error", "upstream_failed")


def coalesce(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge neighbouring chunks that only carry text (the first may also name the role, the last
    may also finish) into one. Chunks that arrived in one network read are all ready at once;
    each one passed on separately costs a langchain chunk, an SSE event and a socket write. A model
    streaming token by token sends one per read, so this only changes anything when the proxy or
    the network falls behind, or the model is quick, which is when it helps."""
    out: list[dict[str, Any]] = []
    for chunk in chunks:
        if out and _continues(out[-1], chunk):
            head, tail = out[-1]["choices"][0], chunk["choices"][0]
            head["delta"]["content"] = (head["delta"].get("content") or "") + (tail["delta"].get("content") or "")
            head["finish_reason"] = tail.get("finish_reason")
            continue
        out.append(chunk)
    return out


def _continues(head: dict[str, Any], tail: dict[str, Any]) -> bool:
    """`tail` only adds text (and maybe the finish) to `head`, which only has text or the role."""
    return (
        _only(head, {"role", "content"})
        and not head["choices"][0].get("finish_reason")
        and _only(tail, {"content"})
        and head["choices"][0].get("index") == tail["choices"][0].get("index")
    )


def _only(chunk: dict[str, Any], keys: set[str]) -> bool:
    """One choice, no usage or logprobs, and a delta with nothing but `keys` (and nulls)."""
    choices = chunk.get("choices")
    if chunk.get("usage") or not choices or len(choices) != 1:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if choice.get("logprobs") or not isinstance(delta, dict):
        return False
    content = delta.get("content")
    return (content is None or isinstance(content, str)) and all(
        value is None for key, value in delta.items() if key not in keys
    )


class _ChatOpenAI(ChatOpenAI):
    """ChatOpenAI that puts a `StoredHistory` in the request as its rounds' messages, converting
    each round once: a 50-round history converted on every request cost ~0.8 ms."""

    def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any) -> dict:
        messages: list[BaseMessage] = input_
        plain = [m for m in messages if not isinstance(m, StoredHistory)]
        payload = super()._get_request_payload(plain, stop=stop, **kwargs)
        if len(plain) == len(messages):
            return payload
        converted = iter(payload["messages"])
        forms: list[dict[str, Any]] = []
        for message in messages:
            if isinstance(message, StoredHistory):
                for stored in message.rounds:
                    forms.extend(self._request_form(stored))
            else:
                forms.append(next(converted))
        payload["messages"] = forms
        return payload

    def _request_form(self, stored: StoredRound) -> tuple[dict[str, Any], ...]:
        if stored.request_form is None:
            messages = as_langchain(history_messages([stored]))
            stored.request_form = tuple(super()._get_request_payload(messages)["messages"])
        return stored.request_form


class Upstream:
    """Made inside the running event loop (the HTTP session belongs to it)."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._base_url = base_url.rstrip("/") + "/"
        self._http = aiohttp.ClientSession(
            headers=headers,
            # Like the openai SDK's: a bound on connecting and on each wait for data, none on the
            # whole reply, which may stream for minutes.
            timeout=aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s),
            connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=60),
        )
        self._llm = _ChatOpenAI(
            model=_PLACEHOLDER_MODEL,
            # Unused for chat (the transport is ours) but validated: ChatOpenAI still builds an
            # SDK client from them and refuses an empty key (a local upstream may need none).
            base_url=base_url,
            api_key=SecretStr(api_key or "unused"),
            async_client=RawChatCompletions(self._http, self._base_url),
            # Stalls are bounded by the HTTP read timeout; this knob costs a task per chunk.
            stream_chunk_timeout=None,
            max_retries=0,
            streaming=True,
            use_responses_api=False,
        )

    async def aclose(self) -> None:
        await self._http.close()

    def stream(
        self,
        messages: list[BaseMessage],
        *,
        model: str,
        params: dict[str, Any],
        include_usage: bool,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
    ) -> AsyncGenerator[Delta, None]:
        kwargs: dict[str, Any] = {"model": model, "stream_usage": include_usage}
        if params:
            kwargs["extra_body"] = params
        if tools:
            kwargs["tools"] = tools
            if tool_choice:
                kwargs["tool_choice"] = tool_choice
        return self._deltas(messages, kwargs)

    async def _deltas(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AsyncGenerator[Delta, None]:
        # ChatOpenAI's own streaming (`_astream`: request payload, transport, chunk conversion),
        # without the Runnable wrapper of `astream`: its callback manager and run bookkeeping, for
        # callbacks this proxy never registers, cost 0.13 ms before the request left and more on
        # every chunk (it also merged every chunk into a copy of the whole reply so far).
        try:
            async for generation in self._llm._astream(messages, **kwargs):
                chunk = cast(AIMessageChunk, generation.message)  # what ChatOpenAI streams
                text = chunk.content if isinstance(chunk.content, str) else chunk.text
                finish_reason = chunk.response_metadata.get("finish_reason")
                usage = None
                if chunk.usage_metadata:
                    usage = {
                        "prompt_tokens": chunk.usage_metadata["input_tokens"],
                        "completion_tokens": chunk.usage_metadata["output_tokens"],
                    }
                calls = tuple(
                    CallFragment(part.get("index") or 0, part.get("id"), part.get("name"), part.get("args") or "")
                    for part in chunk.tool_call_chunks
                )
                if text or finish_reason or usage or calls:
                    yield Delta(text, finish_reason, usage, calls)
        except Exception as exc:
            raise upstream_error(exc) from exc

    async def model_ids(self) -> list[str]:
        try:
            async with self._http.get(self._base_url + "models") as response:
                if response.status != 200:
                    raise await _status_error(response)
                listing = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise upstream_error(exc) from exc
        return [model["id"] for model in listing.get("data", [])]


async def _status_error(response: aiohttp.ClientResponse, *, tools: int = 0) -> ApiError:
    """The upstream's refusal, with its own message (the client's request may be what is wrong)."""
    text = await response.text(errors="replace")
    try:
        error = json.loads(text).get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = text[:200]
    message = str(message or "").strip()[:500] or f"HTTP {response.status}"
    log.warning("upstream answered HTTP %d: %s", response.status, message)
    if response.status == 429:
        return ApiError(429, f"Upstream rate limited the request: {message}", "rate_limit_error", "upstream_rate_limited")
    if 400 <= response.status < 500 and tools and "tool" in message.lower():
        # Many local model servers and reasoning models take no `tools`.
        return ApiError(
            502,
            f"Upstream refused the request's {tools} tool(s): {message}. If this model or server takes no tools, "
            "offer none (TOOLS_ENABLED= and BUILTIN_TOOLS=false, and no `tools` in the request).",
            "upstream_error",
            "upstream_rejected_tools",
        )
    if 400 <= response.status < 500:
        return ApiError(502, f"Upstream refused the request: {message}", "upstream_error", "upstream_refused")
    return ApiError(502, f"Upstream failed (HTTP {response.status}): {message}", "upstream_error", "upstream_failed")


def upstream_error(exc: Exception) -> ApiError:
    """Map an upstream failure to the status the client should see: a short reason for it, the
    details (addresses, exception types) for the log only."""
    if isinstance(exc, ApiError):
        return exc
    log.warning("upstream call failed: %r", exc)
    if isinstance(exc, TimeoutError):
        return ApiError(504, "Upstream timed out.", "upstream_error", "upstream_timeout")
    if isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, aiohttp.ServerDisconnectedError):
        return ApiError(502, "Upstream unreachable.", "upstream_error", "upstream_unreachable")
    if isinstance(exc, aiohttp.ClientError):
        return ApiError(502, "Upstream connection failed.", "upstream_error", "upstream_failed")
    return ApiError(502, "Upstream failed (see the server log).", "upstream_error", "upstream_failed")
