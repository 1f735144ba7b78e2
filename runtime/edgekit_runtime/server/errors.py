"""The one place errors become HTTP replies: ``{"error": "..."}`` with the error's status code.

Both protocols use that body (TF Serving REST and the Open Inference Protocol agree on it).
"""

from __future__ import annotations

import logging

import orjson

from edgekit_runtime.errors import EdgekitError, NotFoundError

__all__ = ["MethodNotAllowedError", "Reply", "RouteNotFoundError", "UnimplementedError", "error_reply", "json_reply"]

log = logging.getLogger("edgekit_runtime.server")

JSON = b"application/json"


class MethodNotAllowedError(EdgekitError):
    http_status = 405


class UnimplementedError(EdgekitError):
    """A TF Serving route edgekit does not implement (classify, regress)."""

    http_status = 501


class RouteNotFoundError(NotFoundError):
    """A path no route matches."""


class Reply:
    """An HTTP reply: status, body, content type and any extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self, status: int, body: bytes, content_type: bytes = JSON, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def json_reply(doc: object, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))


def error_reply(exc: BaseException) -> Reply:
    if isinstance(exc, EdgekitError):
        status, message = exc.http_status, exc.message
        if status >= 500:
            log.warning("%s: %s", type(exc).__name__, message)
    else:
        log.error("internal error while handling a request", exc_info=exc)
        status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
    return Reply(status, orjson.dumps({"error": message}))
