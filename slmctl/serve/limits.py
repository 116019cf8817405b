"""The server's edge: a request's body is bounded before anything reads it whole.

`BodyLimit` is ASGI middleware in front of the routes. A POST whose Content-Length says more than
`max_bytes` is refused with 413 before one byte of its body is read; a body sent without a length
(chunked) is read up to `max_bytes` and refused once it passes that, the rest unread. Either way
the refusal is OpenAI's error shape, and the connection is closed so the unread rest goes nowhere.
A POST to /v1/ must say its body is JSON (415 otherwise, once its bounded body is read, so the
connection stays usable): a body of another type would reach the validator as bytes and be
misreported.
"""

from __future__ import annotations

import asyncio
import json

from slmctl.serve.protocol import error_body

DISCONNECTED = "slmctl.disconnected"  # the scope key of an asyncio.Event set when the client has gone

TEXT_MODEL_BYTES = 1 << 20  # a prompt of 1 MiB is far past any small model's context
VISION_MODEL_BYTES = 32 << 20  # base64 images


def _refusal(status: int, message: str, code: str, close: bool) -> tuple[dict, bytes]:
    body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start = {"type": "http.response.start", "status": status, "headers": headers + ([(b"connection", b"close")] if close else [])}
    return start, body


class BodyLimit:
    def __init__(self, app, max_bytes: int, on_refusal=None):
        self.app, self.max_bytes, self.on_refusal = app, max_bytes, on_refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await self._refuse(scope, send, 400, "Content-Length is not a number", "invalid_request", close=True)
            if declared > self.max_bytes:  # refused unread; the connection closes, so the rest goes nowhere
                return await self._refuse(scope, send, 413, self._too_large(declared), "request_too_large", close=True)
        body, more = bytearray(), True
        while more:  # read here, bounded, and hand the routes what was read
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, send, 413, self._too_large(None), "request_too_large", close=True)
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["path"].startswith("/v1/") and media != b"application/json" and not media.endswith(b"+json"):
            # refused after the (bounded) body was read: the connection stays usable for the client's next request
            return await self._refuse(scope, send, 415, "the request body must be JSON (Content-Type: application/json)",
                                      "unsupported_media_type", close=False)
        # from here on this middleware alone reads the connection: it notices the client going away at once, for
        # routes that ask (scope[DISCONNECTED]) however many wrappers lie between (Starlette's middleware hides it)
        gone = scope[DISCONNECTED] = asyncio.Event()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.create_task(watch())
        try:
            return await self.app(scope, replay, send)
        finally:
            watcher.cancel()

    def _too_large(self, declared: int | None) -> str:
        size = f"{declared} bytes" if declared is not None else "more than that"
        return (f"the request body is {size}; this server takes at most {self.max_bytes} bytes "
                "(slmctl serve ... max_request_bytes=N raises it)")

    async def _refuse(self, scope, send, status: int, message: str, code: str, close: bool) -> None:
        start, body = _refusal(status, message, code, close)
        await send(start)
        await send({"type": "http.response.body", "body": body})
        if self.on_refusal is not None:
            self.on_refusal(scope["path"], status)
