"""OpenAI's speech API on the wire (`POST /v1/audio/speech`): the request body, the response
formats, the SSE events and the error shape `{"error": {"message", "type", "param", "code"}}`.

OpenAI's formats are fixed: 24 kHz mono for all of them (`pcm` is raw 16-bit little-endian).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import ApiError
from core.limits import InvalidJson, parse_json

RATE = 24_000
# OpenAI's `response_format` -> (this server's codec, the response's content type).
FORMATS: dict[str, tuple[str, str]] = {
    "mp3": ("mp3", "audio/mpeg"),
    "opus": ("ogg_opus", "audio/opus"),
    "aac": ("aac", "audio/aac"),
    "flac": ("flac", "audio/flac"),
    "wav": ("wav", "audio/wav"),
    "pcm": ("pcm", "audio/pcm"),
}
MIN_SPEED, MAX_SPEED = 0.25, 4.0


class SpeechError(ApiError):
    """The chat proxy's OpenAI-shaped error (answered and logged by the app's handler), with the
    parameter it is about: the speech API's errors name it, `null` when none."""

    def __init__(self, status: int, message: str, *, code: str | None, param: str | None = None) -> None:
        super().__init__(status, message, "invalid_request_error" if status < 500 else "server_error", code)
        self.param = param

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {**super().body()["error"], "param": self.param}}


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Any name: recorded in the log, never checked (every model is this server's engine).
    model: str = ""
    input: str
    # A voice name or alias, or OpenAI's custom-voice object `{"id": ...}`; none: the default.
    voice: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=MIN_SPEED, le=MAX_SPEED, allow_inf_nan=False)
    # Accepted and ignored: piper voices take no style prompt.
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_id(cls, value: Any) -> Any:
        """A name, or the object's `id`: an empty one, or an object without `id`, is refused as
        OpenAI refuses it (not taken for "the default voice")."""
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get("id")
        if not isinstance(value, str) or not value.strip():
            raise ValueError('must be a voice name or {"id": NAME}')
        return value

    @property
    def codec(self) -> str:
        return FORMATS[self.response_format][0]

    @property
    def content_type(self) -> str:
        return FORMATS[self.response_format][1]


def parse_request(raw: bytes) -> SpeechRequest:
    """The body as a `SpeechRequest`, or a 400 naming the parameter that is wrong."""
    try:
        body = parse_json(raw)
    except InvalidJson as exc:
        raise SpeechError(400, f"The body is {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise SpeechError(400, "The body must be a JSON object.", code="invalid_body")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise SpeechError(400, "`input` is required and must be a non-empty string.", code="missing_input", param="input")
    try:
        return SpeechRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = str(error["loc"][0]) if error["loc"] else None
        hints = {
            "response_format": f"`response_format` must be one of {', '.join(FORMATS)}",
            "speed": f"`speed` must be a number from {MIN_SPEED:g} to {MAX_SPEED:g}",
            "stream_format": "`stream_format` must be 'audio' or 'sse'",
        }
        message = hints.get(param or "", f"`{param}`: {error['msg']}") + f" (got {error.get('input')!r:.80})."
        raise SpeechError(400, message, code=f"invalid_{param or 'body'}", param=param) from exc


def delta_event(audio_b64: str) -> dict[str, str]:
    return {"type": "speech.audio.delta", "audio": audio_b64}


def done_event(input_tokens: int) -> dict[str, Any]:
    """The last SSE event. No tokens are counted here: input tokens are estimated from the text
    (a token per four characters), output tokens are 0 (the audio is no model's tokens)."""
    return {"type": "speech.audio.done", "usage": {"input_tokens": input_tokens, "output_tokens": 0, "total_tokens": input_tokens}}
