"""``/docs``: the API's Swagger UI, served from installed files (no CDN, works offline).

The Swagger UI build comes from the ``swagger-ui-bundle-v2`` package (Swagger UI 5, which
reads the OpenAPI 3.1 that FastAPI writes); the page and its initializer are spotrun's.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} API</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi}"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="/static/apidocs.js"></script>
</body>
</html>
"""

# Swagger UI sets inline styles, so style-src allows them here (and only here); every
# script is a file of this server's.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
}


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's built files."""
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def install(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets from the package (create the app with docs_url=None)."""
    html = _PAGE.format(title=app.title, assets=ASSETS, openapi=app.openapi_url)
    app.mount(ASSETS, StaticFiles(directory=swagger_ui_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(html, headers=_HEADERS)
