"""The one error hierarchy of the runtime: each error knows its HTTP status and CLI exit code.

Transports map these in exactly one place each (``server/errors.py`` for HTTP, the CLI's
``main`` for exit codes); everything else just raises.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base of every error edgekit raises on purpose. The message says what was wrong and how to fix it."""

    http_status: int = 500
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(EdgekitError):
    """A request, file or argument does not fit what is expected (TF Serving: INVALID_ARGUMENT)."""

    http_status = 400
    exit_code = 2


class NotFoundError(EdgekitError):
    """An unknown model, version or file (TF Serving: NOT_FOUND)."""

    http_status = 404
    exit_code = 3


class PayloadTooLargeError(InvalidInputError):
    """A request body over the configured limit."""

    http_status = 413


class UnavailableError(EdgekitError):
    """The server cannot take this now (queue full, model not ready). Retry later (TF Serving: UNAVAILABLE)."""

    http_status = 503
    exit_code = 4


class BundleError(EdgekitError):
    """A bundle file that is missing, malformed, tampered with or inconsistent."""

    http_status = 400
    exit_code = 5


class SignatureError(BundleError):
    """A bundle that is unsigned, signed by a key not trusted here, or changed after signing."""

    exit_code = 9


class BackendError(EdgekitError):
    """The inference engine failed to load or run a model."""

    http_status = 500
    exit_code = 6


class SmokeTestError(EdgekitError):
    """A model's outputs on its golden samples differ from the outputs recorded at conversion."""

    http_status = 500
    exit_code = 7


class MissingDependencyError(EdgekitError):
    """An optional package a command needs is not installed; the message names the pip command."""

    exit_code = 8
