"""`trtc-backend`: serve the app, manage the database."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import typer
import uvicorn

from app.auth import resolve_api_keys
from app.db import database_url
from app.settings import get_settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="TRTC AI-conversation backend.")
db_cli = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
cli.add_typer(db_cli, name="db")


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
    settings = get_settings()
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
        http="httptools",
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


@db_cli.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to `revision` (default: the newest)."""
    from migrations import upgrade

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    typer.echo(f"database at revision {revision}: {database_url(url).render_as_string(hide_password=True)}")


@db_cli.command("revision")
def db_revision(message: str = typer.Option(..., "-m", "--message", help="What the migration does.")) -> None:
    """Write a new migration from the difference between the models and the database."""
    from alembic import command

    from migrations import alembic_config

    command.revision(alembic_config(get_settings().resolved_database_url), message=message, autogenerate=True)


def main() -> None:
    cli()
