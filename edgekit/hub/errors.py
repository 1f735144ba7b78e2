"""The hub's own errors, in edgekit's one hierarchy: each knows its HTTP status and CLI exit code.

The HTTP API maps every EdgekitError to ``{"error": ..., "kind": ...}`` in one place
(``api.error_response``); the client turns ``kind`` back into the same class, so ``edgekit push``
exits with the code the hub's refusal carries (a signature refusal is exit 9 on both sides).
"""

from __future__ import annotations

from edgekit_runtime.errors import (
    BundleError,
    EdgekitError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    SignatureError,
    UnavailableError,
)

__all__ = ["KINDS", "ConflictError", "UnauthorizedError", "error_from_kind", "kind_of"]


class ConflictError(EdgekitError):
    """The request contradicts what the hub holds: a different bundle already pushed under the same
    name, version and profile, or a delete of a version a device runs or a rollout targets."""

    http_status = 409
    exit_code = 15


class UnauthorizedError(EdgekitError):
    """No API token, or not the hub's: the message says where the token is."""

    http_status = 401
    exit_code = 16


#: Stable wire names of the error classes (most specific first, so ``kind_of`` finds the closest).
KINDS: dict[str, type[EdgekitError]] = {
    "signature": SignatureError,
    "bundle": BundleError,
    "payload_too_large": PayloadTooLargeError,
    "invalid_input": InvalidInputError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "unauthorized": UnauthorizedError,
    "unavailable": UnavailableError,
}


def kind_of(error: EdgekitError) -> str:
    """The wire name of ``error``'s class, or of its nearest known ancestor; ``error`` for the rest."""
    for kind, cls in KINDS.items():
        if isinstance(error, cls):
            return kind
    return "error"


def error_from_kind(kind: str, message: str, status: int) -> EdgekitError:
    """Rebuild an error the hub sent, as the class it was raised as there."""
    cls = KINDS.get(kind)
    if cls is not None:
        return cls(message)
    error = EdgekitError(message)
    error.http_status = status
    return error
