"""The orchestrator's custom-TTS wire format: the request body, the content types, and the error
shape `{"error": {"code", "message"}}` (the chat proxy's OpenAI shape has a `type` as well; this
protocol has none, so TTS errors are built here)."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.responses import JSONResponse

from core.limits import InvalidJson, parse_json

log = logging.getLogger("trtc.tts")

MIN_RATE, MAX_RATE = 8000, 48000
# What `?speed=` and `?volume=` take (the speed range is OpenAI's speech API's).
MIN_SPEED, MAX_SPEED = 0.25, 4.0
MIN_VOLUME, MAX_VOLUME = 0.0, 4.0


class TtsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> JSONResponse:
        level = logging.WARNING if self.status < 500 else logging.ERROR
        log.log(level, "%s %s: %s", self.status, self.code, self.message, extra={"code": self.code})
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status)


class TtsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    text: str = Field(alias="Text")
    format: Literal["pcm", "wav", "mp3", "ogg_opus"] = Field(default="wav", alias="Format")
    sample_rate: int = Field(default=16000, alias="SampleRate", ge=MIN_RATE, le=MAX_RATE)
    channel: Literal[1, 2] = Field(default=1, alias="Channel")
    voice: str | None = Field(default=None, alias="Voice")

    @field_validator("format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("channel", mode="before")
    @classmethod
    def _channel_as_number(cls, value: Any) -> Any:
        """"1" and "2" as the numbers, as `SampleRate` takes "16000" (pydantic's lax integers)."""
        if isinstance(value, str) and value.strip() in ("1", "2"):
            return int(value)
        return value



def query_number(query: Mapping[str, str], name: str, low: float, high: float) -> float:
    """A number from the URL's query (`?speed=1.2`), 1.0 without it; a 400 outside [low, high]."""
    raw = query.get(name)
    if raw is None or raw == "":
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also NaN and inf
        raise TtsError(400, f"INVALID_{name.upper()}", f"`?{name}=` must be a number from {low:g} to {high:g} (got {raw[:40]!r}).")
    return value


def parse_request(raw: bytes) -> TtsRequest:
    """The body as a `TtsRequest`, or a 400 naming what is wrong."""
    try:
        body = parse_json(raw)
    except InvalidJson as exc:
        raise TtsError(400, "INVALID_JSON", f"The body is {exc}") from exc
    if not isinstance(body, dict):
        raise TtsError(400, "INVALID_BODY", "The body must be a JSON object.")
    if "SampleRate" not in body and "Sample Rate" in body:
        # One table of the orchestrator's docs spells it with a space.
        body["SampleRate"] = body.pop("Sample Rate")
    text = body.get("Text")
    if not isinstance(text, str) or not text.strip():
        raise TtsError(400, "MISSING_TEXT", "`Text` is required and must be a non-empty string.")
    try:
        # A field sent as null means its default, as one left out does.
        return TtsRequest.model_validate({key: value for key, value in body.items() if value is not None})
    except ValidationError as exc:
        raise TtsError(400, _error_code(exc), _describe(exc)) from exc


_FIELD_CODES = {"Format": "INVALID_FORMAT", "SampleRate": "INVALID_SAMPLE_RATE", "Channel": "INVALID_CHANNEL"}


def _error_code(exc: ValidationError) -> str:
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        if field in _FIELD_CODES:
            return _FIELD_CODES[field]
    return "INVALID_BODY"


def _describe(exc: ValidationError) -> str:
    hints = {
        "Format": "`Format` must be 'pcm', 'wav', 'mp3' or 'ogg_opus'",
        "SampleRate": f"`SampleRate` must be an integer from {MIN_RATE} to {MAX_RATE}",
        "Channel": "`Channel` must be 1 or 2",
    }
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "body"
        parts.append(hints.get(field, f"`{field}`: {error['msg']}") + f" (got {error.get('input')!r:.80})")
    return "; ".join(parts) + "."
