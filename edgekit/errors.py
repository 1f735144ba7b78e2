"""The toolkit's errors: the runtime's hierarchy, plus what only the workstation side can get wrong."""

from __future__ import annotations

from edgekit_runtime.errors import EdgekitError, InvalidInputError, MissingDependencyError, NotFoundError

__all__ = [
    "BudgetError",
    "ConversionError",
    "EdgekitError",
    "InvalidInputError",
    "MissingDependencyError",
    "NotFoundError",
    "ProfileError",
    "UnsupportedOpError",
]


class ProfileError(InvalidInputError):
    """A device profile that is unknown, unreadable or invalid; the message names the file and the key."""

    exit_code = 10


class ConversionError(EdgekitError):
    """The converter could not turn the source model into the target format."""

    exit_code = 11


class UnsupportedOpError(ConversionError):
    """The model uses an op the target cannot run; the message names the op and the profile."""

    exit_code = 12


class BudgetError(EdgekitError):
    """A converted model broke one of its profile's budgets (size, accuracy, latency)."""

    exit_code = 13
