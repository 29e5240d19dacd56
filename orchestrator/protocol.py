"""The callback wire format: `{"EventGroupId", "EventType", "CallbackTs", "EventInfo": {"EventMsTs",
"TaskId", "RoomId", "RoomIdType", "Payload": {...}}}`, signed with `Sign: base64(HMAC-SHA256(key,
raw body))`. Parsing is lenient (every field optional, unknown ones kept): an event this server
does not understand is still stored and answered with 200, so the orchestrator never retries it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ApiError
from core.limits import InvalidJson, parse_json
from llm_proxy.models import ID_MAX_CHARS, storable_id
from llm_proxy.store import without_nul

TASK_STARTED, TASK_STOPPED, TRANSCRIPT, USER_SPEAKS, HEARD, METRIC, ERROR_METRIC, SESSION_READY = (
    901, 902, 903, 904, 905, 906, 908, 909,
)


# What the stored columns hold: 32-bit event types, 64-bit millisecond times, identifiers of
# `ID_MAX_CHARS` without NUL. A field beyond them is the sender's error (400), never a failed write.
INT32 = 2**31 - 1
_INT64 = 2**63 - 1


def _identifier(value: Any, field: str) -> str | None:
    if value in (None, ""):
        return None
    text = str(value)
    if not storable_id(text):
        raise ValueError(f"{field} must be at most {ID_MAX_CHARS} characters, without NUL")
    return text


class EventInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    event_ms_ts: int | None = Field(default=None, alias="EventMsTs", ge=-_INT64, le=_INT64)
    task_id: str | None = Field(default=None, alias="TaskId")
    room_id: str | int | None = Field(default=None, alias="RoomId")
    room_id_type: int | str | None = Field(default=None, alias="RoomIdType")
    payload: dict[str, Any] = Field(default_factory=dict, alias="Payload")

    @field_validator("task_id")
    @classmethod
    def _storable_task_id(cls, value: str | None) -> str | None:
        return _identifier(value, "TaskId")


class CallbackEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    event_group_id: int | None = Field(default=None, alias="EventGroupId")
    event_type: int = Field(alias="EventType", ge=0, le=INT32)
    callback_ts: int | None = Field(default=None, alias="CallbackTs")
    info: EventInfo = Field(default_factory=EventInfo, alias="EventInfo")

    @model_validator(mode="after")
    def _storable_round_id(self) -> CallbackEvent:
        _identifier(self.round_id, "RoundId")
        return self

    @property
    def tag(self) -> dict[str, Any]:
        """The payload's `Tag` (906, 908), if it is an object."""
        tag = self.info.payload.get("Tag")
        return tag if isinstance(tag, dict) else {}

    @property
    def round_id(self) -> str | None:
        """The orchestrator's RoundId: in the payload, or in its `Tag` (906, 908)."""
        value = self.info.payload.get("RoundId") or self.tag.get("RoundId")
        return str(value) if value not in (None, "") else None

    def digest(self, raw: dict[str, Any]) -> str:
        """The event's identity: its type and `EventInfo`, not `CallbackTs` (which a resend may
        renew). The orchestrator resends an event for a minute; it is stored once."""
        canonical = json.dumps([self.event_type, raw.get("EventInfo")], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


def sign(key: str, body: bytes) -> str:
    """What the orchestrator puts in `Sign`: base64(HMAC-SHA256(key, body))."""
    return base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()


def signature_ok(key: str, body: bytes, signature: str | None) -> bool:
    """Compared in constant time."""
    if not signature:
        return False
    return hmac.compare_digest(sign(key, body).encode(), signature.strip().encode())


def parse_event(raw_body: bytes) -> tuple[CallbackEvent, dict[str, Any]]:
    """The event, validated before anything is written: a field the database cannot hold is a
    400 naming it. The body is kept as it came, without NUL characters (which PostgreSQL's
    JSON cannot hold)."""
    try:
        raw = parse_json(raw_body)
    except InvalidJson as exc:
        raise ApiError(400, f"Callback body is {exc}", "invalid_request_error", "invalid_json") from exc
    if not isinstance(raw, dict):
        raise ApiError(400, "Callback body must be a JSON object.", "invalid_request_error", "invalid_json")
    try:
        return CallbackEvent.model_validate(raw), without_nul(raw)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ApiError(400, f"Invalid callback: {details}", "invalid_request_error", "invalid_body") from exc
