"""The real model, called through one long-lived langchain-openai `ChatOpenAI`.

The proxy only ever streams from the upstream (also for non-streaming clients): it sees the first
token as early as possible and can stop paying for tokens the moment its client goes away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator

import openai
from langchain_openai import ChatOpenAI

from app.errors import ApiError
from llm_proxy.context import Msg

# The model name ChatOpenAI is built with; every request names its own model.
_PLACEHOLDER_MODEL = "upstream-default"


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class _RawMessagesChatOpenAI(ChatOpenAI):
    """ChatOpenAI that hands the messages to the openai SDK through `extra_body`.

    The SDK walks every request parameter through a recursive TypedDict transform that changes
    nothing for chat messages but costs ~15 ms for a 50-round history (openai 3.x); `extra_body`
    is merged into the JSON as is. The wire body is identical.
    """

    def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any) -> dict:
        payload = super()._get_request_payload(input_, stop=stop, **kwargs)
        if "messages" in payload:
            payload["extra_body"] = {**(payload.get("extra_body") or {}), "messages": payload["messages"]}
            payload["messages"] = []
        return payload


class Upstream:
    def __init__(self, base_url: str, api_key: str, timeout_s: float) -> None:
        self._llm = _RawMessagesChatOpenAI(
            model=_PLACEHOLDER_MODEL,
            base_url=base_url,
            # An upstream without auth (a local vLLM, say) still needs a non-empty key here.
            api_key=api_key or "unused",
            timeout=timeout_s,
            # The orchestrator retries on its own; retrying here would only add latency.
            max_retries=0,
            streaming=True,
            use_responses_api=False,
        )

    def stream(
        self, messages: list[Msg], *, model: str, params: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[Delta]:
        return self._deltas(messages, model, params, include_usage)

    async def _deltas(
        self, messages: list[Msg], model: str, params: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[Delta]:
        kwargs: dict[str, Any] = {"model": model, "stream_usage": include_usage}
        if params:
            kwargs["extra_body"] = params
        try:
            async for chunk in self._llm.astream(messages, **kwargs):
                text = chunk.content if isinstance(chunk.content, str) else chunk.text
                finish_reason = chunk.response_metadata.get("finish_reason")
                usage = None
                if chunk.usage_metadata:
                    usage = {
                        "prompt_tokens": chunk.usage_metadata["input_tokens"],
                        "completion_tokens": chunk.usage_metadata["output_tokens"],
                    }
                if text or finish_reason or usage:
                    yield Delta(text, finish_reason, usage)
        except Exception as exc:
            raise upstream_error(exc) from exc

    async def model_ids(self) -> list[str]:
        try:
            page = await self._llm.root_async_client.models.list()
        except Exception as exc:
            raise upstream_error(exc) from exc
        return [model.id for model in page.data]


def upstream_error(exc: Exception) -> ApiError:
    """Map an upstream failure to the status the client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, openai.RateLimitError):
        return ApiError(429, f"Upstream rate limited the request: {exc.message}", "rate_limit_error", "upstream_rate_limited")
    if isinstance(exc, openai.APITimeoutError):
        return ApiError(504, "Upstream timed out.", "upstream_error", "upstream_timeout")
    if isinstance(exc, openai.APIStatusError):
        return ApiError(
            502,
            f"Upstream failed with HTTP {exc.status_code}: {exc.message}",
            "upstream_error",
            "upstream_failed",
        )
    if isinstance(exc, openai.APIConnectionError):
        return ApiError(502, f"Upstream unreachable: {exc.message}", "upstream_error", "upstream_unreachable")
    return ApiError(502, f"Upstream failed: {type(exc).__name__}: {exc}", "upstream_error", "upstream_failed")
