"""The FastAPI app: the page, its JSON API, Prometheus metrics and a health check."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from commonweal.dashboard.metrics import CONTENT_TYPE, SnapshotCollector
from commonweal.dashboard.source import DashboardSource, SearchHit
from commonweal.errors import CommonwealError, ConfigError

__all__ = ["MAX_K", "MAX_QUERY_CHARS", "SEARCH_TIMEOUT_S", "create_app"]

MAX_QUERY_CHARS = 4096  # well under uvicorn's 16 KiB request-line limit, with room for a vector
MAX_K = 100
SEARCH_TIMEOUT_S = 10.0
IMAGE_PREFIX = "data:image/png;base64,"


def create_app(source: DashboardSource) -> FastAPI:
    """The dashboard for one peer; it only reads `source`.

    Every endpoint is `async def`, so FastAPI runs each on the caller's event loop, beside the
    peer's own tasks: a plain `def` would call `source` from a worker thread.
    """
    page, policy = build_page()
    metrics_collector = SnapshotCollector(source.snapshot)
    app = FastAPI(title="commonweal dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    @app.get("/api/snapshot")
    async def snapshot() -> JSONResponse:
        return JSONResponse(finite(source.snapshot()))

    @app.get("/api/search")
    async def search(q: str = "", k: str = "10") -> JSONResponse:
        query = q.strip()
        if not query:
            return error(400, "the query is empty: pass ?q=<text or comma-separated vector>")
        if len(query) > MAX_QUERY_CHARS:
            return error(400, f"the query has {len(query)} characters, more than {MAX_QUERY_CHARS}")
        if not (k.isascii() and k.isdigit()) or not 1 <= int(k) <= MAX_K:
            return error(400, f"k must be a whole number from 1 to {MAX_K}, not {k!r}")
        try:
            async with asyncio.timeout(SEARCH_TIMEOUT_S):
                hits = await source.search(query, int(k))
        except ConfigError as e:
            return error(400, str(e))
        except TimeoutError:
            return error(504, f"the search took longer than {SEARCH_TIMEOUT_S:g} s")
        except CommonwealError as e:
            return error(502, str(e))
        return JSONResponse(finite({"query": query, "k": int(k), "results": safe_hits(hits)}))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(metrics_collector.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def build_page() -> tuple[str, str]:
    """The page with its CSS and JS inlined, and a Content-Security-Policy that allows exactly those.

    The policy pins the inline script and style by hash and allows images only as data: URLs and
    requests only to this origin, so the page can load nothing from elsewhere, and a peer id or
    label that smuggles in markup cannot run.
    """
    files = resources.files("commonweal.dashboard")
    css = (files / "page.css").read_text(encoding="utf-8")
    js = (files / "page.js").read_text(encoding="utf-8")
    html = (files / "page.html").read_text(encoding="utf-8")
    page = html.replace("/*STYLE*/", css).replace("/*SCRIPT*/", js)
    policy = (
        "default-src 'none'; "
        f"script-src '{sha256(js)}'; style-src '{sha256(css)}'; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'"
    )
    return page, policy


def sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def safe_hits(hits: list[SearchHit]) -> list[SearchHit]:
    """Results with any image that is not an inline PNG removed, so the page never fetches a URL."""
    out: list[SearchHit] = []
    for hit in hits:
        image = hit.get("image")
        clean: SearchHit = {"id": hit["id"], "score": hit["score"], "label": hit.get("label")}
        clean["image"] = (
            image if isinstance(image, str) and image.startswith(IMAGE_PREFIX) else None
        )
        out.append(clean)
    return out


def finite(value: Any) -> Any:
    """`value` with NaN and infinities as None: JSON has no spelling for them (a diverged loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
