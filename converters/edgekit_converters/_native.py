"""Quiet TensorFlow: its C++ logging and converter chatter go to a log we keep for error messages.

TensorFlow and the MLIR converter print to the process's stderr (file descriptor 2) from C++, so
Python's ``sys.stderr`` redirection cannot catch them. ``captured_stderr`` swaps fd 2 for a
temporary file while a conversion runs and gives the text back, so a failure can quote the
converter's own ``error:`` lines instead of a wall of logs.

In the engine worker (``isolation.py``) fd 1 and fd 2 go to the worker's log for good
(``send_output_to``), and ``captured_stderr`` reads what a block added to that log instead: a crash
inside the block then leaves its last words in the log, where the parent reads them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The log this process's fd 1 and fd 2 were sent to by ``send_output_to`` (the engine worker only).
_output_log: Path | None = None


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


def send_output_to(log: Path) -> None:
    """Send this process's fd 1 and fd 2 to ``log`` for the rest of its life (the engine worker's
    setup): native code can then print nothing to the parent's stdout or terminal."""
    global _output_log  # noqa: PLW0603 - one worker process, set once at its start
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _output_log = log


@contextlib.contextmanager
def _appended_to(log: Path) -> Iterator[Captured]:
    cap = Captured()
    start = log.stat().st_size
    try:
        yield cap
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        with log.open("rb") as f:
            f.seek(start)
            cap.text = f.read().decode(errors="replace")


@contextlib.contextmanager
def captured_stderr() -> Iterator[Captured]:
    """Redirect fd 2 to a temporary file for the block; EDGEKIT_DEBUG=1 leaves it alone."""
    if _output_log is not None:
        with _appended_to(_output_log) as cap:
            yield cap
        return
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
