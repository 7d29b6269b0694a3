"""`BodyGuard`: the request-size limit of `wiola serve`, checked before anything parses a body.

A pure ASGI middleware (it passes streamed responses and the client's disconnect through untouched).
For a request with a body it

* answers 413 at once when `Content-Length` is over the limit (and, when the client waits for
  `100 Continue`, before a byte of the body is sent);
* otherwise reads the body itself, counting bytes as they arrive (a chunked body has no
  `Content-Length`), and answers 413 as soon as the count passes the limit, so no more than `limit`
  bytes of one request are ever held;
* answers 400 when the body is not UTF-8 (JSON is UTF-8; the parser's own message would be "There
  was an error parsing the body");
* then hands the app the body it read, and the client's later messages (its disconnect) as they come.

An over-long body is read to its end and dropped (up to `DRAIN_BYTES`, so that the client, still
sending, gets to read the 413 rather than a reset connection); the connection is closed after it.
Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json

DRAIN_BYTES = 64 * 2**20  # most bytes of an over-long body read (and dropped) before answering 413


def error_body(message: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}).encode()


async def respond(send, status: int, body: bytes, close: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyGuard:
    """ASGI middleware: bodies of at most `limit` bytes, in UTF-8 (see the module docstring)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def too_large(self, size: str) -> bytes:
        return error_body(f"the request body is {size}, over this server's limit of {self.limit:,} bytes "
                          "(wiola serve --max-request-bytes)", "request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await respond(send, 400, error_body(f"bad Content-Length header {declared[:40]!r}"), close=True)
            if length > self.limit:
                if headers.get(b"expect", b"").lower() != b"100-continue":  # the client sends the body anyway
                    await self._drain(receive, 0)
                return await respond(send, 413, self.too_large(f"{length:,} bytes"), close=True)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its whole body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                chunks.clear()
                more = message.get("more_body", False)
                if more:
                    await self._drain(receive, size)
                return await respond(send, 413, self.too_large(f"over {self.limit:,} bytes" if more else f"{size:,} bytes"),
                                     close=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return await respond(send, 400, error_body(f"the request body is not valid UTF-8: byte 0x{body[exc.start]:02x} "
                                                       f"at offset {exc.start}"))
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive, size: int) -> None:
        """Read and drop the rest of a body (at most `DRAIN_BYTES` in all)."""
        while size <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
