"""What a request to /v1 passes before any route sees it: the API key (when the server has one), then a bound
on the body's size, checked on its declared length and while it is read, so an oversized prompt is refused
before it is parsed or tokenized. Both answer in OpenAI's error shape. Other paths (/health) stay open."""
from __future__ import annotations

import hmac
import json

from ruyi_core.serve.protocol import error_body


class Guard:
    """ASGI middleware. `api_key`: requests must bear it (`Authorization: Bearer KEY`), else 401."""

    def __init__(self, app, api_key: str | None, max_body: int, larger: dict[str, int] | None = None):
        """`larger`: paths whose bodies may be larger (a trunk-state hand-off), with their bounds."""
        self.app, self.max_body, self.larger = app, max_body, larger or {}
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
            return await _refuse(send, 401, "this server needs an API key: send `Authorization: Bearer KEY` "
                                            "with the key it was started with (--api-key, RUYI_API_KEY)",
                                 "invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return await _refuse(send, 400, "the Content-Length header is not a number", "invalid_request")
        bound = self.larger.get(scope["path"], self.max_body)
        if int(declared) > bound:
            return await _refuse(send, 413, self._too_big(bound), "request_too_large")
        try:
            body = await self._read(receive, bound)
        except _Gone:
            return None
        if body is None:
            return await _refuse(send, 413, self._too_big(bound), "request_too_large")
        return await self.app(scope, _replay(body, receive), send)

    @staticmethod
    def _too_big(bound: int) -> str:
        return (f"the request body is over this server's bound of {bound} bytes (--max-body-bytes): "
                "a prompt that long would not fit the model's context anyway")

    async def _read(self, receive, bound: int) -> bytes | None:
        """The whole body, or None once it passes the bound (a chunked upload declares no length)."""
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                raise _Gone
            size += len(msg.get("body", b""))
            if size > bound:
                return None
            parts.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                return b"".join(parts)


class _Gone(Exception):
    """The client left while sending its request."""


def _replay(body: bytes, receive):
    """The body, read once already, for the app; then the connection's own messages (a disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


async def _refuse(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
