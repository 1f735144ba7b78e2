"""edgekit's on-device runtime: bundles, backends, batching, HTTP serving.

The public Python API is :class:`Runtime` (``from edgekit_runtime import Runtime``). It is imported
lazily so that ``import edgekit_runtime.bundle`` (the converter's and the hub's contract) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Runtime", "__version__"]

if TYPE_CHECKING:
    from edgekit_runtime.runtime import Runtime


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from edgekit_runtime.runtime import Runtime

        return Runtime
    msg = f"module 'edgekit_runtime' has no attribute {name!r}"
    raise AttributeError(msg)
