"""`trtc-backend`: serve the app, manage the database."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
import uvicorn

from core.auth import resolve_api_keys
from core.db import database_url
from app.http_protocol import GuardedHttpToolsProtocol
from core.settings import Settings, get_settings, settings_or_exit
from knowledge.cli import knowledge_cli

if TYPE_CHECKING:
    from llm_proxy.profiles import Profile

# Commands import what they use inside their own body: `trtc-backend --help` and `db upgrade` stay
# at ~0.5 s, where importing the chat proxy alone takes 1.9 s (langchain-openai) and the
# validator 0.9 s.
cli = typer.Typer(no_args_is_help=True, add_completion=False, help="TRTC AI-conversation backend.")
db_cli = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
cli.add_typer(db_cli, name="db")
config_cli = typer.Typer(no_args_is_help=True, help="Agent profiles (CONFIG_FILE).")
cli.add_typer(config_cli, name="config")
tts_cli = typer.Typer(no_args_is_help=True, help="The TTS server's text handling.")
cli.add_typer(tts_cli, name="tts")
cli.add_typer(knowledge_cli, name="knowledge")
voices_cli = typer.Typer(no_args_is_help=True, help="piper voices in VOICES_DIR, and piper's catalogue (VOICES_BASE_URL).")
cli.add_typer(voices_cli, name="voices")


@cli.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    workers: int = typer.Option(1, min=1, help="Worker processes (use PostgreSQL for more than one)."),
    only: Optional[str] = typer.Option(None, "--only", help="Serve only `llm` (the chat proxy) or `tts`."),
) -> None:
    """Serve the chat proxy and the TTS server (or only one of them)."""
    if only is not None:
        if only not in ("llm", "tts"):
            raise typer.BadParameter("--only takes `llm` or `tts`")
        # The workers build their settings from the environment.
        os.environ["SERVICES"] = only
        get_settings.cache_clear()
    settings = settings_or_exit()
    if settings.serves_llm:
        _check_config(settings, settings.config_file)
    if settings.serves_tts:
        _check_voices(settings)
    # Resolve (maybe generate) the key before workers start, so they all read the same one.
    resolve_api_keys(settings.api_key_list, settings.data_dir)
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="trtc-metrics-")
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=GuardedHttpToolsProtocol,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@cli.command("fake-upstream")
def fake_upstream(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(9000, help="Port to bind."),
    record: bool = typer.Option(True, help="Keep the last requests for GET /_requests."),
) -> None:
    """Serve a fake OpenAI-compatible upstream (tests, benchmarks, trying the stack offline)."""
    from llm_proxy.fake_upstream import create_fake_upstream

    uvicorn.run(
        create_fake_upstream(record=record),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


@cli.command()
def validate(
    llm_url: str = typer.Option(..., help="The LLM endpoint, as in LLMConfig.APIUrl."),
    llm_key: str = typer.Option(..., help="LLMConfig.APIKey."),
    model: str = typer.Option("gpt-4o-mini", help="LLMConfig.Model."),
    tts_url: Optional[str] = typer.Option(None, help="The TTS endpoint, as in TTSConfig.APIUrl."),
    tts_key: Optional[str] = typer.Option(None, help="TTSConfig.APIKey."),
    rounds: int = typer.Option(2, min=1, help="Conversation rounds."),
    timeout_s: float = typer.Option(3.0, help="LLMConfig.Timeout: the first token must come within it."),
    interrupt_ms: Optional[int] = typer.Option(None, help="Interrupt round 1 after this much playback (needs --callback-url)."),
    callback_url: Optional[str] = typer.Option(None, help="Where the 905 of an interruption is sent."),
    callback_key: Optional[str] = typer.Option(None, help="The callback signing key."),
    history: int = typer.Option(0, min=0, max=50, help="LLMConfig.History: rounds of context sent with each request."),
    audio_format: str = typer.Option("pcm", "--format", help="TTSConfig.AudioFormat: pcm or wav."),
    sample_rate: int = typer.Option(16000, help="TTSConfig.SampleRate."),
    channels: int = typer.Option(1, help="TTSConfig.AudioChannel."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Drive an LLM and a TTS endpoint the way the orchestrator does; exit 1 on any failed requirement."""
    import asyncio
    import sys

    import httpx

    from orchestrator.validator import Options, Report, Validator

    if audio_format not in ("pcm", "wav"):
        raise typer.BadParameter("--format takes pcm or wav")
    options = Options(
        llm_url=llm_url, llm_key=llm_key, model=model, tts_url=tts_url, tts_key=tts_key or llm_key, rounds=rounds,
        timeout_s=timeout_s, interrupt_ms=interrupt_ms, callback_url=callback_url, callback_key=callback_key,
        history=history, audio_format=audio_format, sample_rate=sample_rate, channels=channels,
    )

    def progress(line: str) -> None:
        if sys.stderr.isatty():
            typer.echo(line, err=True)

    async def run() -> Report:
        async with httpx.AsyncClient() as http:
            return await Validator(options, http, progress).run()

    report = asyncio.run(run())
    typer.echo(report.as_json() if as_json else report.as_text())
    if not report.ok:
        raise typer.Exit(code=1)


@config_cli.command("check")
def config_check(file: Path = typer.Argument(..., help="The profiles file (YAML, or TOML by extension).")) -> None:
    """Check a profiles file exactly as `serve` does (with this environment's tools); exit 1 with
    the reason if it is wrong."""
    profiles = _check_config(settings_or_exit(), file)
    # `serve` logs these when it loads the file (`load_profiles`); here they are the output.
    for profile in profiles:
        for warning in profile.warnings():
            typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{file}: ok, {len(profiles)} profile(s): " + ", ".join(profile.name for profile in profiles))


def _check_voices(settings: Settings) -> None:
    """What the TTS server checks of `voices.yaml` when it starts, before loading any model:
    one line naming the voice and the field, and exit 1."""
    from tts_server.voices import VoiceSettingsError, check_voices_file

    try:
        check_voices_file(settings.voices_dir, settings.tts_espeak_fallback)
    except VoiceSettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None


def _check_config(settings: Settings, file: Path | None) -> list[Profile]:
    """What the chat proxy checks when it starts: the profiles (`file`, or the implicit one) and
    the tools each names, from every tool source the settings give."""
    import httpx

    from llm_proxy.agents import profile_tools
    from llm_proxy.profiles import ConfigError, Profile, implicit_profile, load_file
    from llm_proxy.tools.loader import load_tools
    from llm_proxy.tools.registry import ToolConfigError

    try:
        profiles: list[Profile] = load_file(file).profiles if file is not None else [implicit_profile(settings)]
        tools, default_tools = load_tools(settings, httpx.AsyncClient())
        for profile in profiles:
            profile_tools(profile, tools, default_tools)
    except (ConfigError, ToolConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    return profiles


@tts_cli.command("normalize")
def tts_normalize(
    text: str = typer.Argument(..., help="The text, as the orchestrator would send it."),
    lang: Optional[str] = typer.Option(None, "--lang", help="en or zh for every piece; default: by script, as the server does."),
) -> None:
    """Print what the voice will be given: the pieces the text is cut into, each as it will be said."""
    from tts_server import text as text_rules
    from tts_server.verbalize import Verbalizer, lang_for

    if lang not in (None, "en", "zh"):
        raise typer.BadParameter("--lang takes en or zh")
    verbalizer = Verbalizer()
    for piece in text_rules.pieces(text):
        grammar = lang or lang_for(text_rules.language(piece), "en")
        spoken = verbalizer(piece, grammar) if grammar in ("en", "zh") else piece  # type: ignore[arg-type]
        typer.echo(f"[{grammar or '-'}] {spoken}")


@voices_cli.command("list")
def voices_list(
    remote: bool = typer.Option(False, "--remote", help="List piper's catalogue (VOICES_BASE_URL) instead."),
) -> None:
    """The installed voices with their settings, or with --remote the catalogue (* = installed)."""
    import httpx

    from tts_server.catalog import CatalogError, fetch_catalog
    from tts_server.voices import VoiceSettingsError, load_voices

    settings = settings_or_exit()
    if remote:
        try:
            with httpx.Client(timeout=30, follow_redirects=True) as client:
                catalog = fetch_catalog(settings.voices_base_url, client)
        except CatalogError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        for voice in sorted(catalog.values(), key=lambda v: v.name):
            installed = "*" if (settings.voices_dir / f"{voice.name}.onnx").exists() else " "
            typer.echo(f"{installed} {voice.name:<40} {voice.language:<8} {voice.quality:<8} {voice.size / 1e6:7.1f} MB")
        return
    try:
        registry = load_voices(settings.voices_dir, default=settings.tts_default_voice, onnx_threads=1,
                               espeak_fallback=settings.tts_espeak_fallback)
    except VoiceSettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    for installed_voice in registry.all:
        info, tuned = installed_voice.info, installed_voice.settings.model_dump(exclude_defaults=True)
        shown = ", ".join(f"{key}={value}" for key, value in tuned.items())
        typer.echo(f"{info.name:<40} {info.language:<8} {info.sample_rate:>6} Hz  {info.engine:<9} {shown}")


@voices_cli.command("download")
def voices_download(names: list[str] = typer.Argument(..., help="Voice names as the catalogue gives them.")) -> None:
    """Fetch voices into VOICES_DIR, checking sizes and MD5 sums; send the server SIGHUP to load them."""
    import httpx

    from tts_server.catalog import CatalogError, download, fetch_catalog

    settings = settings_or_exit()
    try:
        with httpx.Client(timeout=60, follow_redirects=True) as client:
            catalog = fetch_catalog(settings.voices_base_url, client)
            missing = [name for name in names if name not in catalog]
            if missing:
                raise CatalogError(
                    f"not in the catalogue (or not a voice it could safely install): {', '.join(missing)} "
                    "(see `trtc-backend voices list --remote`)"
                )
            for name in names:
                path = download(catalog[name], settings.voices_base_url, settings.voices_dir, client, typer.echo)
                typer.echo(f"installed {name} -> {path}")
    except CatalogError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo("send the server SIGHUP (or restart it) to start using them")


@db_cli.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to `revision` (default: the newest)."""
    from migrations import upgrade

    url = settings_or_exit().resolved_database_url
    upgrade(url, revision)
    typer.echo(f"database at revision {revision}: {database_url(url).render_as_string(hide_password=True)}")


@db_cli.command("revision")
def db_revision(message: str = typer.Option(..., "-m", "--message", help="What the migration does.")) -> None:
    """Write a new migration from the difference between the models and the database."""
    from alembic import command

    from migrations import alembic_config

    command.revision(alembic_config(settings_or_exit().resolved_database_url), message=message, autogenerate=True)


def main() -> None:
    cli()
