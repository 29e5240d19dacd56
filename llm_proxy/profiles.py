"""Agent profiles: several bots from one deployment, each with its prompt, upstream, tools and
history limits, chosen per request by bearer key, then by `model`, then the default.

The profiles come from `CONFIG_FILE` (YAML, or TOML by extension), validated at start-up: an error
names the profile, the field and what is wrong. `${VAR}` reads the environment when the file is
loaded (a missing variable is an error naming it), so secrets stay out of the file. Without a file,
the environment settings make one implicit default profile, which behaves as the proxy always did.

System prompts are templates with a fixed set of variables (`TEMPLATE_VARIABLES`, and
`{meta.KEY}` for the request body's fields, MetaInfo's flattened or nested), checked when the file is loaded; rendering
substitutes values and nothing else (no attribute access, no format specs, no code).
"""

from __future__ import annotations

import logging
import os
import re
import string
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.env import UnsetVariable, expand_env
from core.settings import Settings
from knowledge.embeddings import KnowledgeBaseConfig

TEMPLATE_VARIABLES = frozenset(
    {"user_id", "room_id", "sdk_app_id", "task_id", "date", "time", "weekday", "timezone", "summary", "user_memory",
     "knowledge"}
)
log = logging.getLogger("trtc.profiles")


class ConfigError(ValueError):
    """The profiles file is wrong; the message says where and how."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpstreamConfig(_Strict):
    base_url: str
    api_key: str = ""
    # Replaces the request's `model`.
    model: str | None = None
    # Defaults for the request body; the request's own values win.
    params: dict[str, Any] = Field(default_factory=dict)
    # Also send the request's fields that are no OpenAI parameter (MetaInfo's, say), for a
    # model server that reads them; OpenAI's own API refuses unknown fields with 400.
    forward_extra_fields: bool = False

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]", value, re.IGNORECASE):
            raise ValueError(f"must be an http:// or https:// URL (got {value[:80]!r})")
        return value

    @property
    def label(self) -> str:
        """How the stored round names the upstream that answered it."""
        return f"{self.base_url.rstrip('/')}#{self.model}" if self.model else self.base_url.rstrip("/")


class HistoryLimits(_Strict):
    max_rounds: int | None = Field(default=None, ge=0, le=50)
    max_tokens: int | None = Field(default=None, ge=0)


class OutputConfig(_Strict):
    strip_reasoning: bool = True
    speakable: bool = False


class MemoryConfig(_Strict):
    # Fold rounds that leave the history window into a rolling summary (`memory/`), which the
    # context carries after the system prompt.
    summary: bool = False
    # A user's memory across tasks: a new task of the user starts with what was learnt in their
    # earlier ones (`memory/keeper.py`).
    per_user: bool = False
    # Where the end user's id comes from: `meta.KEY` (a MetaInfo or extra body field set by the
    # business server) or `header.X-User-Id`; unset: `meta.user_id`.
    user_id: str | None = Field(default=None, pattern=r"^(meta\.[A-Za-z0-9_\-]+|header\.X-User-Id)$")
    # The model that writes summaries and users' memories (default: the profile's upstream).
    upstream: UpstreamConfig | None = None
    # The longest summary or user memory kept, in characters.
    max_chars: int = Field(default=2000, ge=100, le=20_000)


class KnowledgeConfig(_Strict):
    # The bases this profile searches (and only these).
    bases: list[str] = Field(min_length=1, max_length=20)
    top_k: int = Field(default=3, ge=1, le=20)
    # auto: searched with the user's turn before the upstream call; tool: the model is offered
    # `search_knowledge` and searches when it wants.
    mode: Literal["auto", "tool"] = "auto"
    # The passages given to the model in one round, at most, in characters.
    max_chars: int = Field(default=2000, ge=200, le=20_000)
    # Passages scoring below this (0..1) are left out.
    min_score: float = Field(default=0.0, ge=0, le=1)

    @field_validator("bases")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}", name):
                raise ValueError(f"{name[:80]!r} is not a knowledge base name (letters, digits, '.', '_', '-')")
        return value


class FastReplyConfig(_Strict):
    # A small, quick model (same fields as `upstream`).
    upstream: UpstreamConfig
    # Speak only if the main model has said nothing by then.
    after_ms: int = Field(default=600, ge=50, le=10_000)
    # The longest line that is spoken; a longer one is not.
    max_chars: int = Field(default=40, ge=4, le=200)
    # What the small model is asked; default `fast_reply.DEFAULT_PROMPT`.
    prompt: str | None = Field(default=None, min_length=1, max_length=4000)


class Profile(_Strict):
    name: str = Field(min_length=1, max_length=64)
    keys: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    default: bool = False
    # None: the environment's upstream (UPSTREAM_BASE_URL, UPSTREAM_API_KEY, UPSTREAM_MODEL).
    upstream: UpstreamConfig | None = None
    fallbacks: list[UpstreamConfig] = Field(default_factory=list)
    first_token_timeout_s: float | None = Field(default=None, gt=0)
    system_prompt: str | None = None
    system_prompt_mode: Literal["replace", "prepend", "append", "ignore"] = "replace"
    timezone: str = "UTC"
    # Names from the tool registry; None: the server's selection (TOOLS_ENABLED); []: none.
    tools: list[str] | None = None
    history: HistoryLimits = Field(default_factory=HistoryLimits)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # The task's `WelcomeMessage` (the orchestrator speaks it itself, without asking the model):
    # stored as the round 0 of every new task, so the model's context opens with it.
    welcome_message: str | None = Field(default=None, min_length=1, max_length=2000)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    # Knowledge bases the bot answers from (`knowledge/`); None: none.
    knowledge: KnowledgeConfig | None = None
    # A quick acknowledgement while the main model thinks (`llm_proxy/fast_reply.py`); None: none.
    fast_reply: FastReplyConfig | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. Asia/Shanghai)") from exc
        return value

    @field_validator("system_prompt")
    @classmethod
    def _safe_template(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value

    def warnings(self) -> list[str]:
        """What the profile says that does nothing (allowed, so that a file can be switched on and
        off piece by piece): `config check` prints these, `serve` logs them."""
        said = f"profile {self.name!r}"
        fields = set(template_fields(self.system_prompt)) if self.system_prompt else set()
        memory = self.memory
        found = []
        if "user_memory" in fields and not memory.per_user:
            found.append(f"{said}: {{user_memory}} in system_prompt is always empty: memory.per_user is off")
        if "summary" in fields and not memory.summary:
            found.append(f"{said}: {{summary}} in system_prompt is always empty: memory.summary is off")
        if memory.user_id is not None and not memory.per_user:
            found.append(f"{said}: memory.user_id is not used: memory.per_user is off")
        if memory.upstream is not None and not (memory.summary or memory.per_user):
            found.append(f"{said}: memory.upstream is not used: memory.summary and memory.per_user are off")
        if "knowledge" in fields and (self.knowledge is None or self.knowledge.mode != "auto"):
            found.append(f"{said}: {{knowledge}} in system_prompt is always empty: knowledge.mode is not auto")
        return found


class ProfilesFile(_Strict):
    profiles: list[Profile] = Field(min_length=1)
    # Options of knowledge bases (an embeddings upstream); a base needs no entry to exist.
    knowledge_bases: list[KnowledgeBaseConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unambiguous(self) -> ProfilesFile:
        _unique("name", [p.name for p in self.profiles])
        _unique("knowledge base", [b.name for b in self.knowledge_bases])
        _unique("key", [key for p in self.profiles for key in p.keys], secret=True)
        _unique("model", [model for p in self.profiles for model in p.models])
        defaults = [p.name for p in self.profiles if p.default]
        if len(defaults) > 1:
            raise ValueError(f"more than one profile has `default: true`: {', '.join(defaults)}")
        return self


def _unique(what: str, values: list[str], *, secret: bool = False) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            shown = "(one of the keys)" if secret else repr(value)
            raise ValueError(f"two profiles claim the same {what} {shown}")
        seen.add(value)


def template_fields(template: str) -> list[str]:
    """The variables a template uses; a ValueError for anything but a plain known variable."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from exc
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(f"{{{name}}}: format specs and conversions are not allowed")
        if not (name in TEMPLATE_VARIABLES or re.fullmatch(r"meta\.[A-Za-z0-9_\-]+", name)):
            allowed = ", ".join(sorted(TEMPLATE_VARIABLES))
            raise ValueError(f"unknown template variable {{{name}}}; allowed: {allowed}, and {{meta.KEY}}")
        names.append(name)
    return names


@dataclass(frozen=True)
class PromptContext:
    """What a system prompt template may say about the request."""

    task_id: str | None
    user_id: str | None
    room_id: str | None
    sdk_app_id: str | None
    meta: Mapping[str, Any]
    # The task's rolling summary of rounds older than the history window (`memory.summary`).
    summary: str | None = None
    # What is remembered of the end user from their earlier tasks (`memory.per_user`).
    user_memory: str | None = None
    # The knowledge passages found for this turn, as the model reads them (`knowledge.mode: auto`).
    knowledge: str | None = None


def render(template: str, timezone: str, context: PromptContext, now: datetime | None = None) -> tuple[str, list[str]]:
    """The template with its variables filled in, and the `{meta.KEY}` names the request lacked
    (rendered empty)."""
    now = (now or datetime.now(ZoneInfo(timezone))).astimezone(ZoneInfo(timezone))
    values = {
        "user_id": context.user_id or "",
        "room_id": context.room_id or "",
        "sdk_app_id": context.sdk_app_id or "",
        "task_id": context.task_id or "",
        "date": now.strftime("%Y-%m-%d"),
        "time": now.strftime("%H:%M"),
        "weekday": now.strftime("%A"),
        "timezone": timezone,
        "summary": context.summary or "",
        "user_memory": context.user_memory or "",
        "knowledge": context.knowledge or "",
    }
    out: list[str] = []
    missing: list[str] = []
    for literal, name, _spec, _conversion in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        if name.startswith("meta."):
            key = name[5:]
            if key not in context.meta:
                missing.append(key)
            out.append(str(context.meta.get(key, "")))
        else:
            out.append(values[name])
    return "".join(out), missing


# -- loading ----------------------------------------------------------------------------------


def load_file(path: Path, environ: Mapping[str, str] | None = None) -> ProfilesFile:
    """The profiles file, `${VAR}` expanded and validated; a ConfigError says what is wrong."""
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from exc
    try:
        raw = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with `profiles:` at the top")
    try:
        expanded = expand_env(raw, environ)
    except UnsetVariable as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return ProfilesFile.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(_describe(error, expanded) for error in exc.errors())) from None


def _describe(error: Any, raw: dict[str, Any]) -> str:
    """`profile 'companion', field system_prompt: what is wrong`."""
    location = list(error["loc"])
    prefix = ""
    if len(location) >= 2 and location[0] == "profiles" and isinstance(location[1], int):
        profiles = raw.get("profiles") or []
        name = profiles[location[1]].get("name") if location[1] < len(profiles) and isinstance(profiles[location[1]], dict) else None
        prefix = f"profile {name!r}" if name else f"profile #{location[1] + 1}"
        location = location[2:]
    field = ".".join(str(part) for part in location)
    message = str(error["msg"]).removeprefix("Value error, ")
    return ", ".join(part for part in (prefix, f"field {field}" if field else "") if part) + f": {message}"


# -- choosing ---------------------------------------------------------------------------------


IMPLICIT = "default"


class Profiles:
    """The loaded profiles and how a request picks one."""

    def __init__(self, profiles: list[Profile], api_keys: list[str],
                 knowledge_bases: list[KnowledgeBaseConfig] | None = None) -> None:
        self.all = profiles
        self.knowledge_bases = knowledge_bases or []
        self._by_key = {key: p for p in profiles for key in p.keys}
        self._by_model = {model: p for p in profiles for model in p.models}
        defaults = [p for p in profiles if p.default]
        self.default: Profile | None = defaults[0] if defaults else (profiles[0] if len(profiles) == 1 else None)
        # Every key this server takes: API_KEYS, and each profile's own.
        self.keys = [*api_keys, *self._by_key]

    def select(self, key: str | None, model: str | None) -> Profile | None:
        """By bearer key first, then by the request's `model`, then the default (if any)."""
        if key is not None and key in self._by_key:
            return self._by_key[key]
        if model is not None and model in self._by_model:
            return self._by_model[model]
        return self.default

    def model_names(self) -> list[str]:
        return [model for p in self.all for model in p.models]


def implicit_profile(settings: Settings) -> Profile:
    """The profile of a server without CONFIG_FILE: the environment's upstream and tools, the
    request's system prompt as it comes."""
    return Profile(
        name=IMPLICIT,
        default=True,
        system_prompt=None,
        history=HistoryLimits(max_rounds=settings.history_max_rounds, max_tokens=settings.history_max_tokens),
        output=OutputConfig(strip_reasoning=True, speakable=False),
        welcome_message=settings.welcome_message or None,
    )


def load_profiles(settings: Settings, api_keys: list[str]) -> Profiles:
    if settings.config_file is None:
        return Profiles([implicit_profile(settings)], api_keys)
    loaded = load_file(settings.config_file)
    for profile in loaded.profiles:
        for warning in profile.warnings():
            log.warning("%s: %s", settings.config_file, warning)
    return Profiles(loaded.profiles, api_keys, loaded.knowledge_bases)
