"""What every `/v1` request (and tokenization) passes before its body is parsed: the API key,
then the body's size.

A pure ASGI middleware, so that an anonymous client learns nothing about the API from malformed
bodies, and a body over the limit is refused while it is being received (never held whole, never
handed to the JSON parser or the tokenizer). The body it lets through is replayed to the app as
it arrived; later `receive` calls (disconnects) go to the server as usual.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steering_server.errors import BodyTooLarge, NotAuthenticated, error_body, respond

# `vllm serve` leaves /tokenize open; here it takes the key too, as tokenizing is work on the
# admission thread that generation waits behind.
GUARDED = ("/v1/", "/tokenize", "/detokenize")


class Gate:
    """Refuse a guarded request without the API key (401), or with a body over `max_body_bytes` (413)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not self._authenticated(request):
            await self._refuse(request, NotAuthenticated("a valid API key is required: send 'Authorization: "
                                                         "Bearer <key>'"), receive, send)
            return
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(request, self._too_large(), receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._refuse(request, self._too_large(), receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _authenticated(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self.api_key.encode())

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"the request body is over {self.max_body_bytes} bytes, the most this server takes "
                            "(`steer serve --max-body-bytes`)")

    @staticmethod
    async def _refuse(request: Request, error: Exception, receive: Receive, send: Send) -> None:
        endpoint = next((route.name for route in request.app.router.routes
                         if route.matches(request.scope)[0] == Match.FULL), "unknown")
        response = respond(request, *error_body(error), endpoint=endpoint)
        await response(request.scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
