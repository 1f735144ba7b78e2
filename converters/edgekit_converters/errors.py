"""The converters' errors: the toolkit's hierarchy, plus what only the converters' engines can do."""

from __future__ import annotations

from edgekit.errors import ConversionError

__all__ = ["EngineCrashError"]


class EngineCrashError(ConversionError):
    """An engine step (TensorFlow's converter or calibrator, tf2onnx, ONNX Runtime's quantizer, the
    validation on LiteRT / ONNX Runtime) crashed, aborted or ran past ``--step-timeout`` in its own
    process. The message names the step, the profile and the mode, quotes the engine's last lines and
    says what to try; the run's other profiles still convert."""

    exit_code = 14
