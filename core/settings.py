"""Settings, read once from the environment (and an optional `.env`)."""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    data_dir: Path = Path("./data")
    database_url: str = ""
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    # SQLite only: the WAL file is emptied (a checkpoint that briefly holds writers off) whenever
    # it grows past this many MB; 0 leaves it to passive checkpoints, under which it grows without
    # bound while writes never pause.
    sqlite_wal_max_mb: int = Field(default=64, ge=0)

    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: str = ""
    upstream_model: str = ""
    # Send the request's fields that are no OpenAI parameter (MetaInfo's) upstream too; off,
    # they reach prompt templates and the stored round only (OpenAI's API refuses them).
    upstream_forward_extra_fields: bool = False
    # Without CONFIG_FILE: the bot's opening words (the task's `WelcomeMessage`), stored as
    # round 0 of every new task (a profile's `welcome_message` otherwise).
    welcome_message: str = Field(default="", max_length=2000)
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    # Agent profiles (YAML, or TOML by extension): prompts, upstreams and tools per bot. Unset:
    # one implicit profile made of the settings here.
    config_file: Path | None = None

    api_keys: str = ""
    # Keys of the admin API (/admin/v1/...), apart from the chat and TTS keys; unset: it is off.
    admin_api_keys: str = ""
    # Tasks last active longer ago than this are deleted with all they hold (unset: kept
    # forever); checked at start and every RETENTION_INTERVAL_S, in small batches.
    retention_days: float | None = Field(default=None, gt=0)
    retention_interval_s: float = Field(default=600.0, gt=0)
    # Larger chat and TTS bodies get 413. A 50-round history of long turns in escaped CJK is
    # under 1 MB.
    max_request_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)

    # Every connection, before any route or key check: a request head (request line and headers)
    # larger than this gets 431; one not complete this long after the connection opened (or its
    # first byte came, on a kept-alive one) gets 408; connections past the cap get 503 at once.
    # The cap is lowered to what the process's file descriptors allow (`app/http_protocol.py`).
    http_max_head_bytes: int = Field(default=64 * 1024, ge=4096, le=1024 * 1024)
    http_head_timeout_s: float = Field(default=5.0, gt=0)
    http_max_connections: int = Field(default=1000, ge=1)

    history_max_rounds: int = Field(default=50, ge=0)
    history_max_tokens: int = Field(default=8000, ge=0)
    # How long a round waits for an earlier one of its task that is still streaming in a live
    # process: below the orchestrator's default LLM timeout of 3 s.
    round_wait_timeout_s: float = Field(default=2.0, ge=0)
    # A process's lease on the rounds it answers, renewed every quarter of it; a round whose
    # owner let it run out is settled as interrupted by the first process that meets it.
    instance_lease_s: float = Field(default=2.0, gt=0)
    # Tasks whose history window each process keeps in memory (0: read it from the DB every round).
    history_cache_tasks: int = Field(default=10_000, ge=0)
    # Per-user memory (a profile's `memory.per_user`): a task without a round for this long has
    # its rounds folded into its user's memory (as a 902 does at once).
    memory_user_idle_s: float = Field(default=900.0, gt=0)
    # The longest one call of the memory upstream may take, however it trickles; past it the
    # fold counts as failed (the memory stays as it was) and is asked again later.
    memory_fold_timeout_s: float = Field(default=60.0, gt=0)

    # Knowledge bases (`knowledge/`): the largest document one upload may be.
    knowledge_max_document_mb: float = Field(default=10.0, gt=0, le=200)

    # Server-side tools: the built-ins, Python modules, an HTTP tools file; TOOLS_ENABLED (comma
    # list, empty for none) narrows them. Tools run concurrently, each with a timeout.
    # Off by default: many OpenAI-compatible servers refuse requests with `tools`, and the
    # sample FAQ must not answer a deployment's users.
    builtin_tools: bool = False
    faq_file: Path | None = None
    tools_modules: str = ""
    tools_file: Path | None = None
    tools_enabled: str | None = None
    tool_timeout_s: float = Field(default=10.0, gt=0)
    tool_max_steps: int = Field(default=5, ge=1)

    # The TTS server. Keys: TTS_API_KEYS, or API_KEYS when unset.
    tts_api_keys: str = ""
    voices_dir: Path = Path("./voices")
    # Where `trtc-backend voices` finds piper's catalogue (voices.json) and voice files: piper's
    # own home on Hugging Face, or an internal mirror of it.
    voices_base_url: str = "https://huggingface.co/rhasspy/piper-voices/resolve/main"
    tts_default_voice: str = ""
    # Per-key default voices: "key1:voice,key2:voice".
    tts_key_voices: str = ""
    tts_max_text_chars: int = Field(default=2000, ge=1)
    # Syntheses at once, onnxruntime threads each (one session per voice, which the workers
    # share), and how long a request may wait for a worker. On 2 cores one synthesis on both
    # cores gives the first audio soonest, idle and under load; two single-threaded ones give
    # 15% more throughput (docs/benchmarks.md, "Engine layout").
    tts_workers: int = Field(default=1, ge=1)
    tts_onnx_threads: int = Field(default=2, ge=1)
    tts_queue_timeout_s: float = Field(default=2.0, gt=0)
    # The first audio every stream should get within: a new stream's first piece goes ahead of
    # other streams' next pieces only while it could otherwise miss this (see `pool`).
    tts_first_audio_target_s: float = Field(default=0.5, gt=0)
    tts_cache_mb: int = Field(default=32, ge=0)
    tts_espeak_fallback: bool = True
    # Numbers, prices, dates, times, units and abbreviations written out as said (English and
    # Chinese pieces; `trtc-backend tts normalize` shows what a text becomes).
    tts_normalize: bool = True

    # The key the orchestrator signs its server callbacks with (at most 32 letters and digits,
    # chosen in the TRTC console). Unset: /api/v1/trtc/callback refuses every request, unless
    # `callback_allow_unsigned` (the console's key is optional; anyone who can reach the route
    # can then write events). With a key, a signature is always required.
    callback_sign_key: str = ""
    callback_allow_unsigned: bool = False
    # How long a 903/905 that came while its round was still open waits for the round to be
    # stored; after that it stays stored, unmatched.
    callback_hold_s: float = Field(default=90.0, gt=0)

    # What `serve` runs: "all", "llm" (chat proxy) or "tts" (set by `serve --only`).
    services: Literal["all", "llm", "tts"] = "all"

    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        scheme = value.partition(":")[0].lower()
        if value and scheme.partition("+")[0] not in _DATABASE_BACKENDS:
            raise ValueError(f"must be sqlite:///FILE or postgresql+asyncpg://USER@HOST/DB, not a {scheme!r} URL")
        return value

    @field_validator("callback_sign_key")
    @classmethod
    def _console_key(cls, value: str) -> str:
        """What the TRTC console takes: 1 to 32 letters and digits (or unset)."""
        if value and not re.fullmatch(r"[A-Za-z0-9]{1,32}", value):
            raise ValueError("must be 1 to 32 letters and digits, as the TRTC console allows")
        return value

    @property
    def resolved_database_url(self) -> str:
        """The configured URL, or a SQLite file under the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'trtc.db').as_posix()}"

    @property
    def serves_llm(self) -> bool:
        return self.services in ("all", "llm")

    @property
    def serves_tts(self) -> bool:
        return self.services in ("all", "tts")

    @property
    def api_key_list(self) -> list[str]:
        return _split(self.api_keys)

    @property
    def admin_api_key_list(self) -> list[str]:
        return _split(self.admin_api_keys)

    @property
    def tools_module_list(self) -> list[str]:
        return _split(self.tools_modules)

    @property
    def tools_enabled_list(self) -> list[str] | None:
        return None if self.tools_enabled is None else _split(self.tools_enabled)

    @property
    def tts_api_key_list(self) -> list[str]:
        return _split(self.tts_api_keys)

    @property
    def tts_key_voice_map(self) -> dict[str, str]:
        pairs = (item.rpartition(":") for item in _split(self.tts_key_voices))
        return {key.strip(): voice.strip() for key, _, voice in pairs if key.strip()}


# Any driver spelling of these (`core.db.database_url` maps each to the one installed).
_DATABASE_BACKENDS = ("sqlite", "postgres", "postgresql")


class SettingsError(Exception):
    """A setting that does not hold, said in one line naming the variable."""


def load_settings() -> Settings:
    """`get_settings()`, with a bad value as a `SettingsError` naming its variable and why."""
    try:
        return get_settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]).upper() if error["loc"] else "a setting"
        reason = str(error["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"{name}: {reason} (got {str(error.get('input'))[:80]!r})") from None


def settings_or_exit() -> Settings:
    """For commands: the settings, or one line on stderr naming the variable that is wrong, and
    exit 1 (no traceback)."""
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
