"""What every plain ASGI middleware of the app shares: HTTP requests only, added headers.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: no per-request objects, and the
request's own `receive` and `send` go on unchanged but for what a middleware adds.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Header = tuple[bytes, bytes]


class HttpMiddleware:
    """A middleware that acts on HTTP requests; lifespan and websocket messages pass by."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One HTTP request; the subclass's whole job."""
        raise NotImplementedError


def adding_headers(send: Send, headers: Sequence[Header]) -> Send:
    """`send` with `headers` appended to the answer's start."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *headers]
        await send(message)

    return send_with_headers
