"""The OpenAI chat-completions wire format, as far as the proxy reads and writes it.

Requests keep every field they arrive with (`extra="allow"`). The body's fields are what the
request carries beside its messages, with the orchestrator's `MetaInfo` read both ways it may
come (its keys flattened into the body, or a nested `"MetaInfo"` object): OpenAI's own request
parameters among them (temperature, max_tokens, ...) go to the upstream unchanged; the others
(`extra_fields`) reach prompt templates as `{meta.KEY}` and are stored with the round, but go
upstream only where a profile says so (OpenAI's API refuses unknown fields).
Responses are built as JSON strings around a pre-encoded prefix, since each streamed token pays
for this.
"""

from __future__ import annotations

import json
import time
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ApiError, bad_request
from core.limits import InvalidJson, parse_json
from llm_proxy.models import ID_MAX_CHARS

Role = Literal["system", "developer", "user", "assistant", "tool"]

# The most messages one request may carry: the orchestrator sends at most 50 rounds of history
# (about 100 messages, more with tool calls). Without a bound, a 2 MiB body of empty messages would
# be 75,000 rows of one round.
MAX_MESSAGES = 1000

# Fields the proxy itself interprets.
_OWN_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "n", "tools"})
# OpenAI's other chat-completions parameters: passed to the upstream as they came.
OPENAI_PARAMETERS = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs", "max_completion_tokens",
    "max_tokens", "metadata", "modalities", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop",
    "store", "temperature", "tool_choice", "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})
# Where the orchestrator may put `LLMConfig.MetaInfo` whole instead of merging its keys.
META_INFO = "MetaInfo"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _flatten_text_parts(cls, value: Any) -> Any:
        """Text parts (`[{"type": "text", "text": ...}]`) become one string; other parts are
        refused, as nothing downstream (the orchestrator's TTS) could use them."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError("only text content parts are supported")
            texts.append(str(part.get("text", "")))
        return "".join(texts)

    @field_validator("tool_calls")
    @classmethod
    def _calls_in_openai_shape(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for call in value or []:
            _ToolCall.model_validate(call)
        return value

    @model_validator(mode="after")
    def _content_where_required(self) -> ChatMessage:
        """As OpenAI's API has it: every message has `content`, except an assistant message that
        makes tool calls; a tool result names the call it answers."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs `content` (a string, or text parts)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs `tool_call_id`")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class _Function(BaseModel):
    name: str
    arguments: str


class _ToolCall(BaseModel):
    """What a `tool_calls` entry must hold; entries are kept as they came (extra keys too)."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: _Function


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, max_length=ID_MAX_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    # The client's own tools: forwarded with the server's, and their calls returned to it.
    tools: list[dict[str, Any]] | None = None

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @cached_property
    def body_fields(self) -> dict[str, Any]:
        """The body's fields beside the proxy's own, a nested `MetaInfo` object's keys merged in
        (the body's own value wins a clash, as the orchestrator merging them would have it).
        Worked out once per request: the prompt's `{meta.KEY}` and both splits below read it."""
        fields = {k: v for k, v in (self.model_extra or {}).items() if k not in _OWN_FIELDS}
        nested = fields.get(META_INFO)
        if isinstance(nested, dict):
            del fields[META_INFO]
            fields = {**nested, **fields}
        return fields

    def passthrough(self) -> dict[str, Any]:
        """OpenAI's parameters among the body's fields, forwarded to the upstream as they came."""
        return {k: v for k, v in self.body_fields.items() if k in OPENAI_PARAMETERS}

    def extra_fields(self) -> dict[str, Any]:
        """The body's fields that are no OpenAI parameter (MetaInfo's, say)."""
        return {k: v for k, v in self.body_fields.items() if k not in OPENAI_PARAMETERS}

    def extra_fields_as_sent(self) -> dict[str, Any]:
        """The body's own fields that are no OpenAI parameter, as it carried them (a nested
        `MetaInfo` stays one object): what an upstream with `forward_extra_fields` gets."""
        return {k: v for k, v in (self.model_extra or {}).items() if k not in _OWN_FIELDS and k not in OPENAI_PARAMETERS}


def parse_request(raw: bytes) -> ChatCompletionRequest:
    try:
        data = parse_json(raw)
    except InvalidJson as exc:
        raise bad_request(f"Request body is {exc}", "invalid_json") from exc
    if not isinstance(data, dict):
        raise bad_request("Request body must be a JSON object.", "invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ApiError(422, f"Invalid request: {details}", "invalid_request_error", "invalid_body") from exc


def usage_dict(usage: dict[str, int] | None) -> dict[str, int] | None:
    if usage is None:
        return None
    prompt = usage.get("prompt_tokens", 0)
    completion = usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChunkWriter:
    """Encodes the `chat.completion.chunk` events of one response."""

    def __init__(self, completion_id: str, model: str) -> None:
        self._head = json.dumps(
            {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        )[:-1]

    def _chunk(self, choices: str, tail: str = "") -> str:
        return f'{self._head}, "choices": [{choices}]{tail}}}'

    def role(self) -> str:
        return self._chunk('{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}')

    def content(self, text: str) -> str:
        return self._chunk(f'{{"index": 0, "delta": {{"content": {json.dumps(text, ensure_ascii=False)}}}, "finish_reason": null}}')

    def tool_calls(self, calls: list[dict[str, Any]]) -> str:
        """Whole calls, one delta: the official clients accumulate fragments and whole calls alike."""
        deltas = [{"index": index, **call} for index, call in enumerate(calls)]
        return self._chunk(f'{{"index": 0, "delta": {{"tool_calls": {json.dumps(deltas, ensure_ascii=False)}}}, "finish_reason": null}}')

    def finish(self, reason: str) -> str:
        return self._chunk(f'{{"index": 0, "delta": {{}}, "finish_reason": {json.dumps(reason)}}}')

    def usage(self, usage: dict[str, int]) -> str:
        return self._chunk("", f', "usage": {json.dumps(usage)}')


def completion_body(
    completion_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: dict[str, int] | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def error_event(error: ApiError) -> str:
    """A mid-stream error; the official client raises `APIError` on an event with `error`."""
    return json.dumps(error.body(), ensure_ascii=False)
