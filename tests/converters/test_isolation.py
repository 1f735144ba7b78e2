"""Engine steps in their worker process: a crash, an abort or a hang is one error for that step and
profile, the run's other profiles still convert, and native output stays off stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit_converters.errors import EngineCrashError
from edgekit_converters.isolation import EngineProcess, EngineSteps, Step
from tests.converters import models
from tests.converters.conftest import FAST

STEP = Step("demo step", "something else")


def _steps(engine: EngineProcess) -> EngineSteps:
    return engine.for_profile("demo", "tflite int8")


def test_abort_is_an_engine_crash_and_the_next_step_gets_a_new_worker(tmp_path: Path) -> None:
    with EngineProcess(tmp_path) as engine:
        steps = _steps(engine)
        before = steps.call(STEP, os.getpid)
        with pytest.raises(EngineCrashError) as err:
            steps.call(STEP, os.abort)
        after = steps.call(STEP, os.getpid)
    assert err.value.exit_code == 14
    assert "demo step for profile demo (tflite int8) aborted (SIGABRT)" in err.value.message
    assert err.value.message.endswith("try something else")
    assert after != before


def test_a_step_that_hangs_stops_at_the_step_timeout(tmp_path: Path) -> None:
    with EngineProcess(tmp_path, timeout_s=1) as engine, pytest.raises(EngineCrashError) as err:
        _steps(engine).call(STEP, time.sleep, 600)
    assert "demo step for profile demo (tflite int8) did not finish within 1 s (--step-timeout)" in err.value.message
    assert "raise --step-timeout if the model is just big, or try something else" in err.value.message


def test_errors_of_a_step_come_back_with_the_worker_traceback(tmp_path: Path) -> None:
    with EngineProcess(tmp_path) as engine, pytest.raises(ValueError, match="invalid literal") as err:
        _steps(engine).call(STEP, int, "x")
    assert "Traceback" in str(err.value.__cause__)


def test_native_output_of_a_step_stays_off_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
    with EngineProcess(tmp_path) as engine:
        _steps(engine).call(STEP, os.write, 1, line)
        _steps(engine).call(STEP, os.write, 2, line)
    out, err = capfd.readouterr()
    assert "XNNPACK" not in out
    assert "XNNPACK" not in err


def test_a_command_that_crashes_is_quoted(tmp_path: Path) -> None:
    code = "import os, sys; print('error: the engine gave up', file=sys.stderr, flush=True); os.abort()"
    with EngineProcess(tmp_path) as engine, pytest.raises(EngineCrashError) as err:
        _steps(engine).command(STEP, [sys.executable, "-c", code], dict(os.environ))
    assert "aborted (SIGABRT); the engine's last output: error: the engine gave up" in err.value.message


@pytest.mark.slow
def test_a_model_that_crashes_the_calibrator(tmp_path: Path) -> None:
    """The real thing, in a real process (the crash killed `edgekit convert` with exit 139 before).
    edgekit unrolls the LSTM to calibrate and the model converts (tests/converters/test_zoo.py); with
    conversion.unroll_recurrent = false TensorFlow's calibrator gets the while loop and crashes."""
    model, tokens = models.text_classifier(tmp_path / "text.keras")
    models.write_profile(tmp_path / "raspberrypi.toml", "raspberrypi", unroll_recurrent=False)
    np.save(tmp_path / "tokens.npy", tokens)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-c", "from edgekit.cli import main; main()",
        "convert", model, "-p", tmp_path / "raspberrypi.toml", "-p", "generic-cpu",
        "--calibration", tmp_path / "tokens.npy",
        "-o", out, "--json", *FAST,
    ]  # fmt: skip
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 14, proc.stderr
    report = json.loads(proc.stdout)  # nothing but the JSON document on stdout
    assert [p["profile"] for p in report["profiles"]] == ["generic-cpu"]
    assert [(f["profile"], f["exit_code"]) for f in report["failed"]] == [("raspberrypi", 14)]
    assert not report["ok"]
    assert [p.name for p in out.iterdir()] == ["text-generic-cpu.ekb"]
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert "for profile raspberrypi (tflite int8) crashed (SIGSEGV)" in error
    assert "tensorflow/lite/python/optimize/calibrator.py" in error
    assert 'conversion.quantization = "dynamic" or "float16"' in error
