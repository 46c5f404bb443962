"""The web chat: one static page (minicpmv/server/static, shipped as package data) served at /,
talking to this server's own /v1 API from the browser. No build step and nothing fetched from
elsewhere, so it works offline. The page is sent with a Content-Security-Policy that allows
only this origin's scripts and styles, so even a rendering bug could not run injected code."""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
          "img-src 'self' data: blob:; media-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
          "frame-ancestors 'none'")


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})


def web_routes() -> list:
    return [Route("/", index, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static")]
