"""Bearer-key auth. With no `API_KEYS` configured the server is never open: a key is generated
once, stored in `<DATA_DIR>/api_key` (mode 0600) and printed, so a fresh `make run` is usable
from the same machine and closed to everyone else."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("trtc.auth")


def resolve_api_keys(configured: list[str], data_dir: Path) -> list[str]:
    if configured:
        return configured
    return [_stored_or_generated_key(data_dir / "api_key")]


def _stored_or_generated_key(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sk-trtc-" + secrets.token_urlsafe(24)
    try:
        # O_EXCL: several workers starting at once agree on the first key written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    log.warning("API_KEYS is not set: generated an API key and stored it in %s: %s", path, key)
    return key


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    # The orchestrator's docs show the key in quotes (`Bearer "API-KEY"`); accept both forms.
    token = token.strip().strip('"')
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def is_authorized(authorization: str | None, keys: list[str]) -> bool:
    token = bearer_token(authorization)
    if token is None:
        return False
    encoded = token.encode()
    # Compare against every key so timing does not reveal which one nearly matched.
    return sum(hmac.compare_digest(encoded, key.encode()) for key in keys) > 0
