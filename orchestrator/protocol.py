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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import ApiError

TASK_STARTED, TASK_STOPPED, TRANSCRIPT, USER_SPEAKS, HEARD, METRIC, ERROR_METRIC, SESSION_READY = (
    901, 902, 903, 904, 905, 906, 908, 909,
)


class EventInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    event_ms_ts: int | None = Field(default=None, alias="EventMsTs")
    task_id: str | None = Field(default=None, alias="TaskId")
    room_id: str | int | None = Field(default=None, alias="RoomId")
    room_id_type: int | str | None = Field(default=None, alias="RoomIdType")
    payload: dict[str, Any] = Field(default_factory=dict, alias="Payload")


class CallbackEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    event_group_id: int | None = Field(default=None, alias="EventGroupId")
    event_type: int = Field(alias="EventType")
    callback_ts: int | None = Field(default=None, alias="CallbackTs")
    info: EventInfo = Field(default_factory=EventInfo, alias="EventInfo")

    @property
    def round_id(self) -> str | None:
        """The orchestrator's RoundId: in the payload, or in its `Tag` (906, 908)."""
        payload = self.info.payload
        value = payload.get("RoundId") or (payload.get("Tag") or {}).get("RoundId")
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
    try:
        raw = json.loads(raw_body)
    except ValueError as exc:
        raise ApiError(400, f"Callback body is not valid JSON: {exc}", "invalid_request_error", "invalid_json") from exc
    if not isinstance(raw, dict):
        raise ApiError(400, "Callback body must be a JSON object.", "invalid_request_error", "invalid_json")
    try:
        return CallbackEvent.model_validate(raw), raw
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ApiError(422, f"Invalid callback: {details}", "invalid_request_error", "invalid_body") from exc
