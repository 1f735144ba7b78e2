"""Quiet TensorFlow: its C++ logging and converter chatter go to a log we keep for error messages.

TensorFlow and the MLIR converter print to the process's stderr (file descriptor 2) from C++, so
Python's ``sys.stderr`` redirection cannot catch them. ``captured_stderr`` swaps fd 2 for a
temporary file while a conversion runs and gives the text back, so a failure can quote the
converter's own ``error:`` lines instead of a wall of logs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tensorflow() -> Any:
    """Import TensorFlow with its logs turned down (imported lazily: it takes seconds)."""
    with captured_stderr():
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    return tf


def keras() -> Any:
    """Keras 3, imported after TensorFlow's logging is turned down."""
    tensorflow()
    import keras as k

    return k


class Captured:
    """Text written to fd 2 inside a ``captured_stderr`` block (filled in when the block ends)."""

    def __init__(self) -> None:
        self.text = ""

    def errors(self, limit: int = 3) -> str:
        """The converter's ``error:`` lines (the ones that say why), else the last lines."""
        lines = [ln.strip() for ln in self.text.splitlines() if ln.strip()]
        picked = [ln for ln in lines if "error:" in ln.lower()] or lines[-limit:]
        return " | ".join(dict.fromkeys(picked[:limit]))


@contextlib.contextmanager
def captured_stderr() -> Iterator[Captured]:
    """Redirect fd 2 to a temporary file for the block; EDGEKIT_DEBUG=1 leaves it alone."""
    cap = Captured()
    if os.environ.get("EDGEKIT_DEBUG"):
        yield cap
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield cap
        return
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield cap
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            cap.text = log.read().decode(errors="replace")
