"""`trtc-backend knowledge ...`: the knowledge bases from the command line, straight on the
database the settings name (DATABASE_URL), as `db upgrade` is. A running server sees the change
within a second. A base's embeddings upstream comes from the profiles file (CONFIG_FILE)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, TypeVar

import typer

from core.settings import settings_or_exit

knowledge_cli = typer.Typer(no_args_is_help=True, help="Knowledge bases the bot answers from.")
T = TypeVar("T")

_TYPES = {".md": "text/markdown", ".markdown": "text/markdown", ".txt": "text/plain", ".text": "text/plain",
          ".html": "text/html", ".htm": "text/html", ".pdf": "application/pdf"}


def _run(work: Callable[[Any], Awaitable[T]]) -> T:
    """`work(db)` against the settings' database; an `ApiError` is one line and exit 1."""
    from core.db import Database
    from core.errors import ApiError

    settings = settings_or_exit()

    async def run() -> T:
        db = Database(settings.resolved_database_url, pool_size=1, max_overflow=0)
        try:
            return await work(db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(run())
    except ApiError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(code=1) from None


@knowledge_cli.command("add")
def add(
    base: str = typer.Argument(..., help="The base (made by its first document)."),
    files: list[Path] = typer.Argument(..., help="Markdown, text, HTML or PDF files.", exists=True, dir_okay=False),
    doc_id: Optional[str] = typer.Option(None, "--id", help="The document's id (one file only); default: the file's name."),
    title: Optional[str] = typer.Option(None, "--title", help="The document's title (one file only)."),
) -> None:
    """Add documents to a base, or replace those with the same id."""
    from knowledge.embeddings import Embedders
    from knowledge.ingest import doc_id_for, ingest
    from llm_proxy.profiles import ConfigError, load_file

    if (doc_id or title) and len(files) > 1:
        raise typer.BadParameter("--id and --title name one document: give one file")
    settings = settings_or_exit()
    try:
        bases = load_file(settings.config_file).knowledge_bases if settings.config_file else []
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    max_bytes = int(settings.knowledge_max_document_mb * 1024 * 1024)

    async def work(db: Any) -> None:
        embedders = Embedders()
        try:
            embedder = embedders.for_bases(bases).get(base)
            for path in files:
                content_type = _TYPES.get(path.suffix.lower())
                if content_type is None:
                    typer.echo(f"error: {path}: not a file type a base takes ({', '.join(sorted(_TYPES))})", err=True)
                    raise typer.Exit(code=1)
                stored = await ingest(db, base, doc_id or doc_id_for(path.stem), path.read_bytes(), content_type,
                                      title=title, embedder=embedder, max_bytes=max_bytes)
                what = "replaced" if stored["replaced"] else "added"
                typer.echo(f"{base}/{stored['id']}: {what}, {stored['chunks']} chunks from {stored['chars']} characters")
        finally:
            await embedders.aclose()

    _run(work)


@knowledge_cli.command("list")
def list_(base: Optional[str] = typer.Argument(None, help="A base: its documents; none: every base.")) -> None:
    """The bases with their counts, or one base's documents."""
    from knowledge import store

    if base is None:
        rows = _run(lambda db: db.run(store.list_bases))
        for row in rows:
            typer.echo(f"{row['name']}\t{row['documents']} documents\t{row['chunks']} chunks"
                       + (f"\tembeddings: {row['embedding_model']}" if row["embedding_model"] else ""))
        if not rows:
            typer.echo("no knowledge bases")
        return
    documents = _run(lambda db: db.run(store.list_documents, base))
    if documents is None:
        typer.echo(f"error: no knowledge base {base!r}", err=True)
        raise typer.Exit(code=1)
    for doc in documents:
        typer.echo(f"{doc['id']}\t{doc['chunks']} chunks\t{doc['content_type']}\t{doc['title'] or ''}")


@knowledge_cli.command("search")
def search(
    base: str = typer.Argument(...),
    query: str = typer.Argument(...),
    top_k: int = typer.Option(5, "--top-k", min=1, max=50),
) -> None:
    """What a round would be given for this query (lexical search)."""
    from knowledge.retrieval import Knowledge

    async def work(db: Any) -> list[Any]:
        knowledge = Knowledge(db)
        await knowledge.refresh(only=base)
        if knowledge.index(base) is None:
            typer.echo(f"error: no knowledge base {base!r}", err=True)
            raise typer.Exit(code=1)
        return await knowledge.search([base], query, top_k)

    for passage in _run(work):
        typer.echo(f"{passage.score:.3f}\t{passage.document}#{passage.chunk}\t{passage.heading}")
        typer.echo("\t" + passage.text.replace("\n", "\n\t"))


@knowledge_cli.command("delete")
def delete(
    base: str = typer.Argument(...),
    doc_id: Optional[str] = typer.Argument(None, help="A document; none: the whole base."),
) -> None:
    """Delete a document, or a whole base with its documents."""
    from knowledge import store

    if doc_id is None:
        documents = _run(lambda db: db.run(store.delete_base, base))
        if documents is None:
            typer.echo(f"error: no knowledge base {base!r}", err=True)
            raise typer.Exit(code=1)
        typer.echo(f"deleted {base} ({documents} documents)")
        return
    if not _run(lambda db: db.run(store.delete_document, base, doc_id)):
        typer.echo(f"error: no document {doc_id!r} in {base!r}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"deleted {base}/{doc_id}")
