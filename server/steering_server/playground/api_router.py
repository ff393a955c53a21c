"""GET /playground: a page to try a policy beside the base, from static files in the package.

The page takes no API key (the gate guards /v1 only): `server.json` tells it whether to ask for
one, and it keeps the key in page memory. Its Content-Security-Policy lets it load nothing from
another host, run no inline script or style, and be framed by no one.
"""

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, JSONResponse

from steering_server.deps import AnyState

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/playground")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/playground/server.json")
async def server_facts(server: AnyState) -> JSONResponse:
    """What the page needs before its first /v1 request: whether to ask for the API key."""
    return JSONResponse({"keyed": server.settings.api_key is not None}, headers=HEADERS)


@router.get("/playground/{asset}")
async def asset(asset: str) -> FileResponse:
    if asset not in ASSETS:
        raise HTTPException(404, f"the playground has no {asset!r}")
    return FileResponse(STATIC / asset, media_type=ASSETS[asset], headers=HEADERS)
