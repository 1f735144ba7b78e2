"""The one place errors become HTTP replies: ``{"error": "..."}`` with the error's status code.

Both protocols use that body (TF Serving REST and the Open Inference Protocol agree on it).
"""

from __future__ import annotations

import logging
import time

import orjson

from edgekit_runtime.errors import EdgekitError, NotFoundError
from edgekit_runtime.metrics import Metrics

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


class _Throttle:
    """At most one log line per error type per ``interval`` seconds, with the count it stood for:
    an overloaded server answers thousands of 503s a second and must not drown its log in them."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        log.warning("%s: %s%s", kind, message, f" (and {more} more like it since the last line)" if more else "")


_throttle = _Throttle()


def error_reply(exc: BaseException, metrics: Metrics | None = None) -> Reply:
    """The reply to a failed request, counted in ``metrics`` by status and kind; a non-EdgekitError is a
    bug: a 500 whose traceback is logged."""
    if isinstance(exc, EdgekitError):
        status, message = exc.http_status, exc.message
        if status >= 500:
            _throttle.warn(type(exc).__name__, message)
    else:
        log.error("internal error while handling a request", exc_info=exc)
        status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
    if metrics is not None:
        metrics.http_error(status, type(exc).__name__)
    return Reply(status, orjson.dumps({"error": message}))
