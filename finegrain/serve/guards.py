"""What every request passes before a route sees it: the bearer token and the body-size bound.

Both are plain ASGI middleware, so they answer before FastAPI parses anything: a request
without the token costs the server no body read, and a body over the limit is never buffered
or spooled to disk. Every refusal is the same JSON as the routes' errors (`error_body`).
"""
from __future__ import annotations

import hmac
import json
from typing import Awaitable, Callable

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]
API_PREFIX = "/v1/"


def error_body(status: int, code: str, message: str) -> dict:
    """The one shape of every error answer: {"status", "error" (a short name), "message" (what to do)}."""
    return {"status": status, "error": code, "message": message}


async def send_error(send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, code, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BearerToken:
    """Every route under /v1/ needs `Authorization: Bearer TOKEN` (compared in constant time).

    The page, its two asset files and /healthz stay open: they hold nothing of the index, and the
    page asks for the token itself when the API answers 401.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("This server needs a token: send the header 'Authorization: Bearer TOKEN' with the token "
                           "it was started with." if not given else "The token is wrong. Send the server's token.")
                await send_error(send, 401, "unauthorized", message, {"www-authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """A request body is read whole, up to `max_bytes`, before the app sees it.

    Form parsing would otherwise spool a body of any size to disk first. A larger one is answered
    413 after up to `4 * max_bytes` of it have been read and dropped, so that a client still
    sending gets the answer rather than a reset connection; beyond that the connection is closed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, 4 * max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            size = int(declared) if declared.isdigit() else None
            if size is not None and size <= self.drain_bytes:
                await self._drain(receive, 0)
            await self._refuse(send, size)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._drain(receive, total)
                await self._refuse(send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: the disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, seen: int) -> None:
        while seen <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            seen += len(message.get("body", b""))

    async def _refuse(self, send: Send, declared: int | None) -> None:
        size = f"{declared:,} bytes" if declared is not None else "a larger body"
        await send_error(send, 413, "too_large", f"The request carries {size}, more than the limit of "
                                                 f"{self.max_bytes:,} bytes. Send a smaller image.")
