"""The server's two HTML pages, each under a Content-Security-Policy that allows only this server's own
scripts and the page's inline script by hash: the try-it page (``/``, page.html) and the API docs (``/docs``,
Swagger UI from fastapi-offline's copy of its files, so a server without internet access still shows them)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from tansuo.serve.security import content_security_policy

DOCS_ASSETS = "/docs/assets"


def add_pages(app: Any) -> set[str]:
    """Add ``/``, ``/docs`` and the docs' assets to ``app`` (made with ``docs_url=None``); returns the paths
    (for the request metrics' route names)."""
    page = resources.files("tansuo.serve").joinpath("page.html").read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": content_security_policy(page)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def try_it() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    assets = resources.files("fastapi_offline").joinpath("static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
    docs = get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - API",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
    ).body.decode("utf-8")
    docs_headers = {"Content-Security-Policy": content_security_policy(docs)}

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return HTMLResponse(docs, headers=docs_headers)

    return {"/", "/docs"}
