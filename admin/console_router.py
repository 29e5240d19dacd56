"""The console's static files, served by the backend itself at `/console/` (no separate server,
no build step). Like the admin API it exists only with `ADMIN_API_KEYS` set; the page holds no
data, everything it shows comes from the admin API with the key the operator signs in with."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from admin.api_router import require_enabled
from core.errors import not_found

router = APIRouter()

_DIR = Path(__file__).with_name("console")
_TYPES = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
          "console.css": "text/css; charset=utf-8"}
# Only this server's own files and API; audio the page makes itself plays from blob: URLs.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "media-src 'self' blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@cache
def _file(name: str) -> bytes:
    return (_DIR / name).read_bytes()


@router.get("/console", include_in_schema=False)
async def console_root(request: Request) -> Response:
    require_enabled(request)
    # Relative, so the console works behind a reverse proxy that adds a path prefix.
    return RedirectResponse("console/", status_code=308)


@router.get("/console/{name}", include_in_schema=False)
@router.get("/console/", include_in_schema=False)
async def console_file(request: Request, name: str = "index.html") -> Response:
    require_enabled(request)
    if name not in _TYPES:
        raise not_found()
    return Response(_file(name), media_type=_TYPES[name],
                    headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
