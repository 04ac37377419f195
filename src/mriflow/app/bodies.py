"""What a request may send the app: a bounded body, a JSON object that parses, and fields of the right type.

Every body the app reads is a small JSON object (a generation request or a Turing answer is under a kilobyte), so
a body over MAX_BODY bytes is refused with 413 before it is read (`BodyLimit`, for every route, by its declared
length) or while it is read (`json_body`, for a body sent in chunks without one). A body that is not a JSON object,
or one nested deeper than Python's parser recurses, is 400. The field readers refuse what JSON allows but the app
must not take: a boolean for a number (`true` is not 1), a number that is not finite (`1e400` parses as inf), a
missing or non-string name (`null` is not the rater "None"). Each error is one line that names the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Receive, Scope, Send

MAX_BODY = 64 * 1024  # bytes
TOO_LARGE = f"the request body is over {MAX_BODY} bytes, the most this app reads; send a smaller JSON object"
SHOWN = 40  # characters of a refused value quoted back


class BodyLimit:
    """ASGI middleware: a request that declares a body over `limit` bytes (`limits[path]` for the routes named there,
    e.g. an upload's) gets 413 before any route runs."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY, limits: dict[str, int] | None = None):
        self.app, self.limit, self.limits = app, limit, dict(limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"0")
            limit = self.limits.get(scope.get("path", ""), self.limit)
            if not declared.isdigit() or int(declared) > limit:
                too_large = TOO_LARGE if limit == self.limit else f"the request body is over {limit} bytes, the most this route reads"
                body = json.dumps({"detail": too_large if declared.isdigit() else "Content-Length is not a number"})
                await send({"type": "http.response.start", "status": 413 if declared.isdigit() else 400,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await self.app(scope, receive, send)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; a form post (which another site could send unasked) is refused (415), and so is
    a body over MAX_BODY bytes (413, counted as it arrives), one that is not JSON or nests too deeply (400)."""
    if not request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        raise HTTPException(415, "send JSON (Content-Type: application/json)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise HTTPException(413, TOO_LARGE)
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise HTTPException(400, "the body is nested too deeply (arrays or objects inside each other); "
                                 "send a flat JSON object") from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError too
        raise HTTPException(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def text(body: dict[str, Any], name: str, default: str | None = None) -> str:
    """body[name] as a string; ValueError naming the field when it is missing (and no default) or not a string."""
    value = body.get(name, default)
    if not isinstance(value, str):
        missing = name not in body
        raise ValueError(f"{name} must be a string" + (", and is missing" if missing else f", got {shown(value)}"))
    return value


def number(body: dict[str, Any], name: str, minimum: float | None = None) -> float | None:
    """body[name] as a finite float, or None when absent or null; ValueError naming the field for a boolean, a
    string, a non-finite number or one under `minimum`."""
    value = body.get(name)
    if value is None:
        return None
    return finite(value, name, minimum)


def finite(value: Any, name: str, minimum: float | None = None) -> float:
    """A JSON number as a finite float (booleans refused); ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a float's range
        number = math.inf
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {shown(value)}")
    return number


async def file_body(request: Request, limit: int) -> bytes:
    """A file sent as the body itself (Content-Type: application/octet-stream: a page on another site cannot send it
    unasked, 415 otherwise), at most `limit` bytes counted as it arrives (413)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/octet-stream":
        raise HTTPException(415, "send the file itself as the body (Content-Type: application/octet-stream)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise HTTPException(413, f"the upload is over {limit // 2**20} MB, the most this app reads")
    return bytes(raw)
