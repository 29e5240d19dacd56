"""The knowledge bases' admin routes (behind `ADMIN_API_KEYS`, like the rest of `/admin/v1`)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from admin.api_router import authorize
from core.errors import ApiError, bad_request
from knowledge import store
from knowledge.extract import media_type
from knowledge.ingest import check_base, check_doc_id, ingest
from knowledge.protocol import SearchRequest
from knowledge.retrieval import Knowledge

log = logging.getLogger("trtc.knowledge")
router = APIRouter()


def _knowledge(request: Request) -> Knowledge:
    knowledge: Knowledge = request.app.state.knowledge
    return knowledge


def _no_base(base: str) -> ApiError:
    return ApiError(404, f"No knowledge base {base[:80]!r}.", "invalid_request_error", "knowledge_base_not_found")


def _no_document(base: str, doc_id: str) -> ApiError:
    return ApiError(404, f"No document {doc_id[:80]!r} in knowledge base {base[:80]!r}.", "invalid_request_error",
                    "document_not_found")


async def _body(request: Request, max_bytes: int, what: str = "document") -> bytes:
    """The body, read no further than the limit: a larger one is 413 before it is all in."""
    limit = " (KNOWLEDGE_MAX_DOCUMENT_MB)" if what == "document" else ""
    too_large = ApiError(413, f"The {what} is larger than {max_bytes} bytes, the most it may be{limit}.",
                         "invalid_request_error", f"{what}_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise too_large
        parts.append(part)
    return b"".join(parts)


@router.get("/admin/v1/knowledge")
async def bases(request: Request) -> Any:
    authorize(request)
    return JSONResponse({"data": await request.app.state.db.run(store.list_bases)})


@router.get("/admin/v1/knowledge/{base}/documents")
async def documents(request: Request, base: str) -> Any:
    authorize(request)
    found = await request.app.state.db.run(store.list_documents, check_base(base))
    if found is None:
        raise _no_base(base)
    return JSONResponse({"base": base, "data": found})


@router.get("/admin/v1/knowledge/{base}/documents/{doc_id}")
async def document(request: Request, base: str, doc_id: str) -> Any:
    authorize(request)
    found = await request.app.state.db.run(store.get_document, check_base(base), check_doc_id(doc_id))
    if found is None:
        raise _no_document(base, doc_id)
    return JSONResponse(found)


@router.put("/admin/v1/knowledge/{base}/documents/{doc_id}")
async def put_document(request: Request, base: str, doc_id: str) -> Any:
    """The body is the file, its type in Content-Type; `?title=` names it."""
    authorize(request)
    check_base(base)
    check_doc_id(doc_id)
    content_type = request.headers.get("content-type", "")
    media_type(content_type)  # 415 before the body is read
    settings = request.app.state.settings
    max_bytes = int(settings.knowledge_max_document_mb * 1024 * 1024)
    body = await _body(request, max_bytes)
    knowledge = _knowledge(request)
    stored = await ingest(
        request.app.state.db, base, doc_id, body, content_type, title=request.query_params.get("title"),
        embedder=knowledge.embedders.get(base), max_bytes=max_bytes,
    )
    await knowledge.refresh(only=base)
    log.info("knowledge: stored document %s/%s (%d chunks)", base, doc_id, stored["chunks"])
    return JSONResponse(stored, status_code=200 if stored["replaced"] else 201)


@router.delete("/admin/v1/knowledge/{base}/documents/{doc_id}")
async def delete_document(request: Request, base: str, doc_id: str) -> Any:
    authorize(request)
    if not await request.app.state.db.run(store.delete_document, check_base(base), check_doc_id(doc_id)):
        raise _no_document(base, doc_id)
    await _knowledge(request).refresh(only=base)
    log.info("knowledge: deleted document %s/%s", base, doc_id)
    return JSONResponse({"deleted": {"base": base, "documents": [doc_id]}})


@router.delete("/admin/v1/knowledge/{base}")
async def delete_base(request: Request, base: str) -> Any:
    authorize(request)
    documents = await request.app.state.db.run(store.delete_base, check_base(base))
    if documents is None:
        raise _no_base(base)
    await _knowledge(request).refresh(only=base)
    log.info("knowledge: deleted base %s (%d documents)", base, documents)
    return JSONResponse({"deleted": {"base": base, "documents": documents}})


@router.post("/admin/v1/knowledge/{base}/search")
async def search(request: Request, base: str) -> Any:
    authorize(request)
    check_base(base)
    try:
        asked = SearchRequest.model_validate_json(await _body(request, 64 * 1024, "search"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise bad_request(f"Invalid search: {problems}.", "invalid_search") from None
    knowledge = _knowledge(request)
    if knowledge.index(base) is None:
        await knowledge.refresh(only=base)
        if knowledge.index(base) is None:
            raise _no_base(base)
    passages = await knowledge.search([base], asked.query, asked.top_k, asked.min_score)
    return JSONResponse({"base": base, "query": asked.query, "results": [p.result() for p in passages]})
