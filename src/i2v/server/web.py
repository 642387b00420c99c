"""The web page at `/`: static files from the package, no build step. The page talks to the API like
any other client (so it needs no auth of its own: the token lives in the browser)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

WEB_DIR = Path(str(resources.files("i2v") / "web"))
# The page's ES modules and style (no build step); nothing else under web/ is ever served.
ASSETS = {
    "style.css": "text/css",
    **{
        name: "text/javascript"
        for name in ("app.js", "api.js", "rules.js", "progress.js", "snippets.js", "history.js", "clip.js")
    },
}
# The page loads only its own script and style; images and clips come as blob:/data: or from the API.
CSP = (
    "default-src 'self'; img-src 'self' blob: data: https: http:; media-src 'self' blob: https: http:; "
    "connect-src 'self' https: http:; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)
# Revalidate every time (ETag / Last-Modified make that cheap), so an upgrade shows at once.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(
        WEB_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={**HEADERS, "Content-Security-Policy": CSP},
    )


@router.get("/index.html")
def index_alias() -> RedirectResponse:
    return RedirectResponse("./", status_code=308)


@router.get("/web/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path ever reaches the file system from the URL
        raise HTTPException(status_code=404, detail="Not found")
    return FileResponse(WEB_DIR / name, media_type=f"{ASSETS[name]}; charset=utf-8", headers=HEADERS)
