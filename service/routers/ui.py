"""The web page: ``GET /ui`` (and ``GET /``, which redirects there).

One static HTML file (``service/static/ui.html``, inline CSS and JavaScript, no build step and
no external resources) that uses only the public API: it lists the models with
``GET /v1/models``, scores a drawing (JSON integers 0-255 at the model's size, for small grey models) or an uploaded file
(multipart) with ``POST /v1/models/{name}/score`` asking for the reconstruction and error map as
base64 PNGs, and polls ``GET /metrics`` for the live view. The page itself is open, like the
docs; when API keys are configured it sends the key the user types as a bearer token.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["ui"])


@lru_cache(maxsize=1)
def page() -> str:
    return (STATIC / "ui.html").read_text(encoding="utf-8")


@router.get("/ui", response_class=HTMLResponse, summary="Web page for scoring images")
async def ui() -> HTMLResponse:
    """Pick a model, draw or upload an image, and see its score, threshold, decision,
    reconstruction and error map; plus a live view of the service's recent scores."""
    return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)
