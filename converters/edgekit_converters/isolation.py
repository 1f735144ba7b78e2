"""Engine steps in a child process, so that a native crash, abort or hang becomes an error.

TensorFlow's converter and int8 calibrator, tf2onnx, ONNX Runtime's quantizer and the validation on
LiteRT / ONNX Runtime run native code that can kill the process it runs in (TensorFlow's calibrator
segfaults on an Embedding + LSTM model over int32 token ids, for one). So they run in a worker
process: a fresh interpreter (never a fork: the parent has imported TensorFlow to load the source,
and TensorFlow is not fork-safe) talking over a socket pair (``multiprocessing.connection``);
started when a run begins and reused by its steps and by later runs of the same process, so
TensorFlow is imported there once (while the parent loads the source), not per step; replaced after
a crash, a timeout or an interrupt. tf2onnx already runs as its own command and gets the
same time limit and crash report (``EngineSteps.command``).

A step that kills the worker, or runs past the step timeout, raises ``EngineCrashError`` naming the
step, the profile and the mode, quoting the engine's last lines and where it died (Python's
``faulthandler`` writes the stack on a fatal signal), and saying what to try.

The worker's fd 1 and fd 2 go to a log in the current run's temporary folder
(``_native.send_output_to``): native logs never reach the parent's stdout (``convert --json``) or
the terminal, and the log's tail is what the error quotes. The worker's temporary files live in the
run's folder too, so a crash leaves none behind.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

from edgekit_converters import _native
from edgekit_converters.errors import EngineCrashError

__all__ = ["DEFAULT_STEP_TIMEOUT_S", "EngineProcess", "EngineSteps", "Step"]

DEFAULT_STEP_TIMEOUT_S = 600.0
_TAIL_BYTES = 64 * 1024
# faulthandler's dump: after a fatal signal, or of every thread when asked (a step that hangs)
_STACK = re.compile(r"^(Fatal Python error:|Thread 0x|Current thread 0x)", re.M)
_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
_SIGNALS = {"SIGSEGV": "crashed", "SIGBUS": "crashed", "SIGILL": "crashed", "SIGFPE": "crashed", "SIGABRT": "aborted"}
_T = TypeVar("_T")
_BOOT = "import sys; from edgekit_converters.isolation import serve; serve(int(sys.argv[1]), sys.argv[2])"


@dataclass(frozen=True)
class Step:
    """One engine step, as the error that names it says it: what ran and what to try instead."""

    name: str  # e.g. "TFLite conversion (with calibration)"
    try_instead: str  # e.g. 'a copy of the profile with conversion.quantization = "dynamic"'


class _WorkerTraceback(Exception):  # noqa: N818 - not an error itself: shows where one was raised
    """The traceback of an exception raised in the worker, chained to it in the parent as its cause."""


def serve(fd: int, warm: str) -> None:
    """The worker's main: run jobs ``(log, tmpdir, fn, args, kwargs)`` from the connection on ``fd``,
    each with its output in its run's ``log``, until killed or orphaned (the connection closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops this process
    debug = bool(os.environ.get("EDGEKIT_DEBUG"))
    log = ""
    # Python's warnings (TensorFlow's deprecations) are not the engine's words: keep them out of its log.
    warnings.simplefilter("ignore")
    faulthandler.enable()  # on a fatal signal, the Python stack goes to the log: where it died
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1)  # the parent asks for the stack of a step that hangs
    conn = Connection(fd)
    if warm == "tensorflow":
        # Importing it and looking for devices (its CUDA probe logs errors on a machine without a
        # GPU) now keeps that noise out of the first step's log.
        _native.tensorflow().config.list_physical_devices()
    conn.send((True, None, ""))  # ready: what follows in the log is the steps' own output
    while True:
        try:
            job_log, tmpdir, fn, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if not debug and job_log != log:  # a new run: its own log and temporary folder
            _native.send_output_to(Path(job_log))
            log = job_log
        os.environ["TMPDIR"] = tempfile.tempdir = tmpdir
        try:
            reply: tuple[bool, Any, str] = (True, fn(*args, **kwargs), "")
        except BaseException as e:  # noqa: BLE001 - every failure of a step goes back to the parent
            reply = (False, e, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - an unpicklable result or exception
            conn.send((False, RuntimeError(f"{type(e).__name__}: {e}"), traceback.format_exc()))


class _Worker:
    """One worker process, reused by consecutive runs; replaced after a crash, timeout or interrupt."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._tensorflow = False
        self._boot: IO[bytes] | None = None  # the process's output until its first job

    def start(self, *, tensorflow: bool) -> None:
        """Start the process if none runs; with ``tensorflow`` it (and any process replacing it)
        imports TensorFlow first, while the caller goes on."""
        self._tensorflow = self._tensorflow or tensorflow
        if self._proc is not None and self._proc.poll() is None:
            return
        self.close()
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        debug = bool(os.environ.get("EDGEKIT_DEBUG"))
        # Until its first job, the output goes to a file of its own, not to a run's folder: the run
        # that started it may end (and remove its folder) before the process is even ready.
        self._boot = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the process's life
        with theirs:
            # Our own interpreter and a fixed bootstrap: the parent's __main__ is not re-imported
            # (multiprocessing's spawn would).
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(fd), "tensorflow" if self._tensorflow else ""],
                stdin=subprocess.DEVNULL,
                stdout=2 if debug else self._boot,  # EDGEKIT_DEBUG: logs on the terminal, never on stdout
                stderr=None if debug else self._boot,
                pass_fds=[fd],
            )
        self._conn = Connection(ours.detach())  # the worker's end is closed here: its death reads as EOF
        self._ready = False

    def close(self) -> None:
        """Stop the process. Killed, not asked: its files are all in runs' temporary folders, and a
        graceful exit would wait about a second for TensorFlow's teardown."""
        proc, conn, boot = self._proc, self._conn, self._boot
        self._proc = self._conn = self._boot = None
        if boot is not None:
            boot.close()
        if proc is None or conn is None:
            return
        proc.kill()
        proc.wait()
        conn.close()

    def run(
        self, log: Path, tmpdir: Path, timeout_s: float, job: tuple[Callable[..., _T], tuple[Any, ...], dict[str, Any]]
    ) -> _T:
        """``fn(*args, **kwargs)`` of ``job`` in the worker, its output in ``log``: its result, or its
        exception raised here; ``_Crashed`` when the worker dies or runs past ``timeout_s``."""
        self.start(tensorflow=False)
        try:
            if not self._ready:
                self._reply(timeout_s, self._boot_output)  # the start-up (TensorFlow's import)
                self._ready = True
            assert self._conn is not None  # start() set it
            start = _size(log)
            self._conn.send((str(log), str(tmpdir), *job))
            return self._reply(timeout_s, lambda: _tail(log, start))  # type: ignore[no-any-return]
        except (KeyboardInterrupt, SystemExit):
            self.close()  # interrupted mid-step: its reply would confuse the next run
            raise

    def _boot_output(self) -> str:
        if self._boot is None:
            return ""
        self._boot.seek(0)
        return self._boot.read()[-_TAIL_BYTES:].decode(errors="replace")

    def _reply(self, timeout_s: float, output: Callable[[], str]) -> Any:
        """The next reply; ``_Crashed`` quoting ``output()`` when the process dies or takes too long."""
        assert self._proc is not None and self._conn is not None  # start() set them
        proc, conn = self._proc, self._conn
        if conn.poll(timeout_s):
            try:
                ok, value, remote_tb = conn.recv()
            except (EOFError, OSError):
                try:
                    cause = _died(proc.wait(5))
                except subprocess.TimeoutExpired:
                    cause = _died(None)
            else:
                if not ok:
                    raise value from _WorkerTraceback(remote_tb)
                return value
        else:
            if hasattr(signal, "SIGUSR1"):
                proc.send_signal(signal.SIGUSR1)  # faulthandler writes where it hangs to the log
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1)
            cause = _timed_out(timeout_s)
        said = output()
        self.close()
        raise _Crashed(cause, said)


def _size(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def _tail(log: Path, start: int) -> str:
    if not log.exists():
        return ""
    with log.open("rb") as f:
        f.seek(max(start, _size(log) - _TAIL_BYTES))
        return f.read().decode(errors="replace")


# One worker per Python process, so that several runs in one process (a script converting several
# models, the tests) import TensorFlow in it once; a run that finds it busy (another thread) gets its own.
_shared = _Worker()
_shared_free = threading.Lock()
atexit.register(_shared.close)


class EngineProcess:
    """One run's use of a worker: its log and temporary folder in ``workdir``, its step time limit.
    ``for_profile`` gives the steps of one profile."""

    def __init__(self, workdir: Path, *, timeout_s: float = DEFAULT_STEP_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._log = workdir / "engine.log"
        self._tmp = workdir / "engine-tmp"
        self._tmp.mkdir(exist_ok=True)
        self._shares = _shared_free.acquire(blocking=False)
        self._worker = _shared if self._shares else _Worker()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def start(self, *, tensorflow: bool = False) -> None:
        """Have the worker ready (it imports TensorFlow meanwhile when asked) while the caller goes on."""
        self._worker.start(tensorflow=tensorflow)

    def close(self) -> None:
        """The shared worker stays for the next run; a private one is stopped."""
        if self._shares:
            self._shares = False
            _shared_free.release()
        elif self._worker is not _shared:
            self._worker.close()

    def for_profile(self, profile: str, mode: str) -> EngineSteps:
        return EngineSteps(self, profile, mode)

    def run(self, fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _T:
        return self._worker.run(self._log, self._tmp, self.timeout_s, (fn, args, kwargs))


class _Crashed(Exception):  # noqa: N818 - internal: turned into EngineCrashError by EngineSteps
    def __init__(self, cause: str, tail: str) -> None:
        super().__init__(cause)
        self.cause = cause
        self.tail = tail


def _timed_out(timeout_s: float) -> str:
    return f"did not finish within {timeout_s:g} s (--step-timeout)"


def _died(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if name == "SIGKILL":
            return "was killed (SIGKILL: out of memory?)"
        return f"{_SIGNALS.get(name, 'was killed')} ({name})"
    return f"exited with code {exitcode}"


def _where(frames: str) -> str:
    """The innermost frame of faulthandler's dump of the current thread, e.g. ``tensorflow/lite/...py:152 (fn)``."""
    current = frames.split("Current thread", 1)[-1]
    m = _FRAME.search(current)
    if m is None:
        return ""
    path = m["path"].split("site-packages/")[-1]
    return f" in {path}:{m['line']} ({m['func']})"


def _describe(tail: str) -> tuple[str, str]:
    """(where it died, the engine's last lines) from the log written during the step."""
    m = _STACK.search(tail)
    engine, frames = (tail[: m.start()], tail[m.start() :]) if m else (tail, "")
    captured = _native.Captured()
    captured.text = engine
    said = captured.errors()
    return _where(frames), f"; the engine's last output: {said}" if said else "; the engine printed nothing"


class EngineSteps:
    """The engine steps of one profile: Python functions in the worker, commands in their own process."""

    def __init__(self, engine: EngineProcess, profile: str, mode: str) -> None:
        self._engine = engine
        self.profile = profile
        self.mode = mode

    def call(self, step: Step, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` in the worker (``fn`` and its arguments are pickled); its errors are
        raised here; a crash or timeout raises EngineCrashError."""
        try:
            return self._engine.run(fn, args, kwargs)
        except _Crashed as e:
            raise self._crash(step, e.cause, e.tail) from None

    def command(self, step: Step, cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` with the step timeout; a crash or timeout raises EngineCrashError, any other
        exit is the caller's to judge."""
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, check=False, timeout=self._engine.timeout_s
            )
        except subprocess.TimeoutExpired as e:
            out = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
            raise self._crash(step, _timed_out(self._engine.timeout_s), out) from None
        if proc.returncode < 0:
            raise self._crash(step, _died(proc.returncode), proc.stderr)
        return proc

    def _crash(self, step: Step, cause: str, tail: str) -> EngineCrashError:
        where, said = _describe(tail)
        timed_out = "--step-timeout" in cause
        hint = f"raise --step-timeout if the model is just big, or try {step.try_instead}" if timed_out else ""
        msg = (
            f"{step.name} for profile {self.profile} ({self.mode}) {cause}{where}{said}; "
            f"no bundle for {self.profile}; {hint or 'try ' + step.try_instead}"
        )
        return EngineCrashError(" ".join(msg.split()))
