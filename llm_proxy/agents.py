"""Profiles bound to what they run with: an upstream client, a tool selection, a system prompt.

`Agents` is built from the loaded profiles at start-up and again on `SIGHUP`; a round keeps the
`Agent` it started with, so a reload changes new rounds only. Upstream clients are shared by
every profile that names the same base URL and key, and kept across reloads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from core.errors import bad_request
from core.settings import Settings
from llm_proxy.context import Msg
from llm_proxy.profiles import KnowledgeConfig, PromptContext, Profile, Profiles, UpstreamConfig, render, template_fields
from llm_proxy.tools.registry import Tool, ToolConfigError, ToolRegistry
from llm_proxy.upstream import Upstream

log = logging.getLogger("trtc.profiles")


@dataclass(frozen=True)
class Agent:
    profile: Profile
    upstream: Upstream
    upstream_config: UpstreamConfig
    tools: ToolRegistry
    # The profile's fallbacks, in order, with their clients.
    fallbacks: tuple[tuple[UpstreamConfig, Upstream], ...] = ()
    # The client of the profile's `fast_reply.upstream`.
    fast_upstream: Upstream | None = None

    @property
    def name(self) -> str:
        return self.profile.name

    def model(self, requested: str | None) -> str | None:
        return self.upstream_config.model or requested

    @staticmethod
    def params(config: UpstreamConfig, passthrough: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """An upstream's parameter defaults under the request's own values (and its other
        fields, where the upstream takes them)."""
        if config.forward_extra_fields:
            passthrough = {**extra, **passthrough}
        return {**config.params, **passthrough} if config.params else passthrough

    def system(self, requested: list[Msg], context: PromptContext) -> list[Msg]:
        """The system message(s) the upstream gets: the profile's prompt (rendered) and the
        request's, as `system_prompt_mode` says. `replace`: the profile's instead of the
        request's (the request's stays when the profile has none); `prepend`/`append`: both,
        in one message; `ignore`: the request's is dropped."""
        profile = self.profile
        mode = profile.system_prompt_mode
        memory = self._memory_sections(context) if context.summary or context.user_memory else []
        if profile.system_prompt is None:
            return memory if mode == "ignore" else [*requested, *memory]
        prompt, missing = render(profile.system_prompt, profile.timezone, context)
        if missing:
            log.info("the request has no MetaInfo %s for profile %r's prompt; rendered empty", missing, profile.name)
        theirs = "\n\n".join(str(m.get("content") or "") for m in requested).strip()
        if mode in ("replace", "ignore") or not theirs:
            return [{"role": "system", "content": prompt}, *memory]
        joined = f"{prompt}\n\n{theirs}" if mode == "prepend" else f"{theirs}\n\n{prompt}"
        return [{"role": "system", "content": joined}, *memory]

    def _memory_sections(self, context: PromptContext) -> list[Msg]:
        """Memory's own system sections, after the prompt: those its template does not place."""
        placed = set(template_fields(self.profile.system_prompt)) if self.profile.system_prompt else set()
        sections = []
        if context.user_memory and "user_memory" not in placed:
            sections.append({"role": "system", "content": f"{USER_MEMORY_HEADING}\n{context.user_memory}"})
        if context.summary and "summary" not in placed:
            sections.append({"role": "system", "content": f"{SUMMARY_HEADING}\n{context.summary}"})
        return sections


# Head memory's own system sections (when the profile's prompt does not place `{user_memory}` or
# `{summary}`).
USER_MEMORY_HEADING = "What you remember about this user from earlier conversations:"
SUMMARY_HEADING = "Summary of the earlier conversation (older turns are not repeated below):"


class Agents:
    def __init__(self, profiles: Profiles, agents: dict[str, Agent]) -> None:
        self.profiles = profiles
        self._agents = agents

    @property
    def keys(self) -> list[str]:
        return self.profiles.keys

    def get(self, name: str) -> Agent | None:
        return self._agents.get(name)

    def select(self, key: str | None, model: str | None) -> Agent:
        profile = self.profiles.select(key, model)
        if profile is None:
            known = ", ".join(self.profiles.model_names()) or "none"
            raise bad_request(
                f"No profile serves model {model!r} and the key selects none; the profiles' models: {known}.",
                "no_profile",
            )
        return self._agents[profile.name]


class UpstreamClients:
    """One client per upstream base URL and key, made on first use, kept until shutdown."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clients: dict[tuple[str, str], Upstream] = {}

    def environment(self) -> UpstreamConfig:
        settings = self._settings
        return UpstreamConfig(
            base_url=settings.upstream_base_url,
            api_key=settings.upstream_api_key,
            model=settings.upstream_model or None,
            forward_extra_fields=settings.upstream_forward_extra_fields,
        )

    def get(self, config: UpstreamConfig) -> Upstream:
        key = (config.base_url, config.api_key)
        if key not in self._clients:
            self._clients[key] = Upstream(config.base_url, config.api_key, self._settings.upstream_timeout_s)
        return self._clients[key]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


# Makes a profile's `search_knowledge` tool (`knowledge.for_rounds.RoundKnowledge.tool`).
KnowledgeTool = Callable[[KnowledgeConfig], Tool]


def profile_tools(
    profile: Profile, tools: ToolRegistry, default_tools: ToolRegistry, knowledge_tool: KnowledgeTool | None = None
) -> ToolRegistry:
    """The tools a profile offers (with `search_knowledge` for `knowledge.mode: tool`); a name the
    registry lacks is a `ToolConfigError` naming the profile (what stops a start or a reload, and
    what `config check` reports)."""
    try:
        selected = default_tools if profile.tools is None else tools.narrowed(profile.tools)
        if knowledge_tool is not None and profile.knowledge is not None and profile.knowledge.mode == "tool":
            selected = selected.with_tool(knowledge_tool(profile.knowledge))
        return selected
    except ToolConfigError as exc:
        raise ToolConfigError(f"profile {profile.name!r}, field tools: {exc}") from None


def build_agents(
    profiles: Profiles, tools: ToolRegistry, default_tools: ToolRegistry, clients: UpstreamClients,
    knowledge_tool: KnowledgeTool | None = None,
) -> Agents:
    """Bind each profile; a profile naming a tool the registry lacks stops the (re)load."""
    agents = {}
    for profile in profiles.all:
        config = profile.upstream or clients.environment()
        selected = profile_tools(profile, tools, default_tools, knowledge_tool)
        fallbacks = tuple((fallback, clients.get(fallback)) for fallback in profile.fallbacks)
        fast = clients.get(profile.fast_reply.upstream) if profile.fast_reply is not None else None
        agents[profile.name] = Agent(profile, clients.get(config), config, selected, fallbacks, fast)
    return Agents(profiles, agents)
