"""`edgekit demo`: the product's whole story on this machine, with the embedded defaults.

Converts the bundled digits example for a Raspberry Pi (TFLite int8) and a Jetson Orin (ONNX
float16), signs it with a fresh key, makes a v2 whose Jetson model gains an input range check,
starts a hub (embedded MQTT broker, SQLite) and four simulated devices as real processes, deploys
v1, sends live traffic (one Jetson request in five with pixel values 0-255, "a camera that sends
0-255"), rolls v2 out in waves with a health window (the Jetson fails its window and goes back to v1
by itself, the Pis end on v2), prints the dashboard's address and the fleet, and keeps running
until Ctrl-C or SIGTERM.

Everything lives in the work folder (``--workdir``, default ``./edgekit-demo``). The converted v1
bundles are cached there, keyed by the example files' sha256 and the edgekit version; everything
else (keys, signed bundles, hub data, device stores, logs) is made afresh on each run.

Exit codes: 0 when the story finished (after ``--no-wait``, or after Ctrl-C/SIGTERM ended the wait);
130 when Ctrl-C/SIGTERM came before the story finished (everything is stopped all the same); an
error's own code otherwise (one line saying what to do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click

from edgekit import __version__
from edgekit.cli._output import console
from edgekit.errors import ConversionError, EdgekitError, InvalidInputError, MissingDependencyError
from edgekit_runtime.errors import UnavailableError

__all__ = ["demo"]

MODEL = "digits"
PROFILES = ("raspberrypi", "jetson-orin")
#: (device id, profile, site label); the v2 rollout goes to them in this order (see _V2_TO)
DEVICES = (
    ("pi-1", "raspberrypi", "lab"),
    ("pi-2", "raspberrypi", "lab"),
    ("pi-3", "raspberrypi", "shop"),
    ("jetson-1", "jetson-orin", "shop"),
)
EXAMPLE_FILES = ("model.keras", "calibration.npy", "validation.npz")
#: the v2 range check's table: pixel values 0 to 16 index it; 17 and more fail in the engine
TABLE_ROWS = 17
RATE = 10.0  # requests per second to each device
BAD_EVERY = 5  # one jetson-1 request in BAD_EVERY carries pixel values 0-255
HEALTH_WINDOW = "10s"
WAVES = "1,50%,100%"
ABORT_FAILURE_RATE = "50"
# A list keeps its order in the waves (`all` takes the devices sorted by id): pi-1 is the canary,
# pi-2 the second wave, pi-3 and jetson-1 the last. With `--to all` jetson-1 would be first by id
# and alone in the canary wave, and its failure (100% of 1 finished) would abort the rollout.
_V2_TO = ",".join(d[0] for d in DEVICES)

DEVICE_STOP_S = 15.0  # SIGTERM, then SIGKILL after this
HUB_STOP_S = 40.0  # the hub lets requests in flight finish for up to 30 s
START_S = 90.0  # the hub's and a device's announcement
ROLLOUT_S = 300.0

_HUB_LINE = re.compile(r"^edgekit hub on (http://\S+) \(data ")
_BROKER_LINE = re.compile(r"^embedded MQTT broker on (mqtt://\S+) ")
_DEVICE_LINE = re.compile(r"edgekit-runtime serving on (http://\S+) \(")


class Interrupted(Exception):  # noqa: N818 - a signal, not an error
    """SIGINT or SIGTERM arrived."""


def say(text: str) -> None:
    """One human line on stderr (no markup: reasons and paths are printed as they are)."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def _kb(n: int) -> str:
    return f"{n / 1000:.1f} kB"


def _edgekit() -> list[str]:
    """The `edgekit` command of this Python: the script beside sys.executable, else `python -c`."""
    script = Path(sys.executable).parent / "edgekit"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from edgekit.cli import main; main()"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the demo dies without cleaning up (kill -9)."""
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    h.update(f"edgekit {__version__}".encode())
    return h.hexdigest()


def find_example() -> Path:
    """examples/digits of the repository this edgekit was installed from (editable), else of the
    current folder."""
    import edgekit

    for root in (Path(edgekit.__file__).resolve().parent.parent, Path.cwd()):
        folder = root / "examples" / "digits"
        if all((folder / f).is_file() for f in EXAMPLE_FILES):
            return folder
    msg = (
        "the bundled example (examples/digits/model.keras, calibration.npy, validation.npz) is not here: "
        "run edgekit demo from a clone of the edgekit repository after scripts/setup"
    )
    raise InvalidInputError(msg)


# -- processes -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Child:
    """A process the demo started, in a session of its own (the terminal's Ctrl-C reaches the demo
    only, which stops the children in order)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stop_s: float

    def alive(self) -> bool:
        return self.proc.poll() is None


class Children:
    """Every process the demo starts; ``stop_all`` stops the devices (and a converter) first, then the hub."""

    def __init__(self) -> None:
        self.items: list[Child] = []

    def start(self, name: str, args: list[str], log: Path, *, stop_s: float, env: dict[str, str] | None = None,
              stdout: IO[bytes] | None = None) -> Child:  # fmt: skip
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as err:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else err,
                stderr=err,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - every child starts before the demo's threads do
            )
        child = Child(name, proc, log, stop_s)
        self.items.append(child)
        return child

    def stop(self, group: list[Child]) -> None:
        """SIGTERM to each (and its process group), wait up to each one's bound, SIGKILL what is left."""
        import psutil

        tracked: dict[int, list[psutil.Process]] = {}
        for c in group:
            try:
                p = psutil.Process(c.proc.pid)
                tracked[c.proc.pid] = [p, *p.children(recursive=True)]
            except psutil.Error:
                tracked[c.proc.pid] = []
            if c.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
        end = time.monotonic() + max((c.stop_s for c in group), default=0.0)  # one bound for the group
        for c in group:
            try:
                c.proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"  {c.name} did not stop within {c.stop_s:g} s of SIGTERM: killed")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait(10)
            for p in tracked.get(c.proc.pid, []):  # what it started (e.g. the converter's step processes)
                with contextlib.suppress(psutil.Error):
                    p.kill()
        for c in group:
            with contextlib.suppress(ValueError):
                self.items.remove(c)

    def stop_all(self) -> None:
        devices = [c for c in self.items if c.name not in ("hub",)]
        self.stop(devices)
        self.stop([c for c in self.items if c.name == "hub"])
        import psutil

        left = psutil.Process().children(recursive=True)  # the net under it all
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=10)


# -- traffic -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Counts:
    sent: int = 0
    errors: int = 0
    unscaled: int = 0  # requests with pixel values 0-255
    unscaled_errors: int = 0


class Traffic(threading.Thread):
    """Requests to every device at RATE each: TF Serving :predict to the Pis, Open Inference Protocol
    v2 infer to jetson-1, one in BAD_EVERY of those with pixel values 0-255 (x * 255)."""

    def __init__(self, devices: dict[str, str], rows: Any) -> None:
        super().__init__(name="edgekit-demo-traffic", daemon=True)
        self.devices = devices  # id -> base URL
        self.rows = rows
        self.counts = {d: Counts() for d in devices}
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        import httpx

        clients = {d: httpx.Client(base_url=url, timeout=5.0) for d, url in self.devices.items()}
        n = 0
        try:
            next_at = time.monotonic()
            while not self.halt.is_set():
                row = self.rows[n % len(self.rows)]
                for device, client in clients.items():
                    unscaled = device.startswith("jetson") and n % BAD_EVERY == BAD_EVERY - 1
                    ok = self._send(client, device, row * 255.0 if unscaled else row)
                    with self.lock:
                        c = self.counts[device]
                        c.sent += 1
                        c.unscaled += unscaled
                        c.errors += not ok
                        c.unscaled_errors += unscaled and not ok
                n += 1
                next_at += 1.0 / RATE
                delay = next_at - time.monotonic()
                if delay < -1.0:  # far behind (a busy machine): do not try to catch up
                    next_at = time.monotonic()
                self.halt.wait(max(0.0, delay))
        finally:
            for client in clients.values():
                client.close()

    @staticmethod
    def _send(client: Any, device: str, row: Any) -> bool:
        import httpx

        values = [round(float(v), 4) for v in row]
        try:
            if device.startswith("jetson"):
                body = {"inputs": [{"name": "pixels", "shape": [1, len(values)], "datatype": "FP32", "data": values}]}
                r = client.post(f"/v2/models/{MODEL}/infer", json=body)
            else:
                r = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [values]})
        except httpx.HTTPError:
            return False
        return bool(r.status_code == 200)

    def line(self) -> str:
        with self.lock:
            parts = []
            for d, c in self.counts.items():
                extra = f" ({c.unscaled} with pixels 0-255, {c.unscaled_errors} of them failed)" if c.unscaled else ""
                parts.append(f"{d} {c.sent} sent, {c.errors} errors{extra}")
        return "traffic: " + "; ".join(parts)

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(10)


class Reporter(threading.Thread):
    """Prints the traffic line every ``every`` seconds until stopped."""

    def __init__(self, traffic: Traffic, every: float) -> None:
        super().__init__(name="edgekit-demo-reporter", daemon=True)
        self.traffic, self.every = traffic, every
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            say("  " + self.traffic.line())


# -- the story -----------------------------------------------------------------------------------


class Demo:
    def __init__(self, workdir: Path, port: int | None) -> None:
        self.work = workdir.resolve()
        self.port = port
        self.children = Children()
        self.traffic: Traffic | None = None
        self.reporter: Reporter | None = None
        self.hub_url = ""
        self.token = ""
        self.rollout_v2 = ""
        self.device_urls: dict[str, str] = {}
        self.hub: Child | None = None
        self.devices: dict[str, Child] = {}
        self.public_key = Path()
        self.broker_url = ""
        self.rows: Any = None  # the example's validation pixels: the traffic and the v2 check

    # paths

    @property
    def hub_data(self) -> Path:
        return self.work / "hub"

    @property
    def hub_log(self) -> Path:
        return self.work / "hub.log"

    @property
    def keys(self) -> Path:
        return self.work / "keys"

    def device_dir(self, device: str) -> Path:
        return self.work / "devices" / device

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_HUB")}
        env["EDGEKIT_HUB"] = self.hub_url
        env["EDGEKIT_HUB_TOKEN"] = self.token
        return env

    # checks

    def check(self) -> None:
        """What the story needs, each missing piece one line saying what to install."""
        from edgekit.hub.embedded_broker import check_embedded_broker

        check_embedded_broker()
        missing = [m for m in ("onnxruntime", "ai_edge_litert") if importlib.util.find_spec(m) is None]
        if missing:
            msg = (
                f"the simulated devices serve TFLite and ONNX, and {', '.join(missing)} is not installed: "
                "pip install './runtime[tflite,onnx]' (scripts/setup installs everything)"
            )
            raise MissingDependencyError(msg)
        if importlib.util.find_spec("onnx") is None:
            msg = "v2's range check is built with the onnx package, which is not installed: pip install onnx"
            raise MissingDependencyError(msg)
        if self.port is not None and not _port_free(self.port):
            msg = f"port {self.port} on 127.0.0.1 is already in use; choose another with --port N, or leave --port out"
            raise UnavailableError(msg)

    def fresh(self) -> None:
        """The run's folders made afresh; the conversion cache kept."""
        for name in ("hub", "devices", "keys", "bundles"):
            shutil.rmtree(self.work / name, ignore_errors=True)
        for name in ("hub.log", "cli.log", "request.json", "request-0-255.json"):
            (self.work / name).unlink(missing_ok=True)

    # 1. convert (cached)

    def convert(self, example: Path) -> tuple[Path, dict[str, Any]]:
        from edgekit_runtime.bundle import read_bundle
        from edgekit_runtime.errors import BundleError

        key = _sha256_files([example / f for f in EXAMPLE_FILES])
        cache = self.work / "cache" / f"v1-{key[:16]}"
        report_file = cache / "convert.json"
        if all((cache / f"{MODEL}-{p}.ekb").is_file() for p in PROFILES) and report_file.is_file():
            try:
                report: dict[str, Any] = json.loads(report_file.read_text())
                what = self._converted(report)
                for profile in PROFILES:
                    read_bundle(cache / f"{MODEL}-{profile}.ekb")  # whole and consistent, or converted again
            except (ValueError, KeyError, TypeError, BundleError):
                shutil.rmtree(cache, ignore_errors=True)
            else:
                say(f"1/7 convert: reused the conversion cached in {self.rel(cache)} (same example files, "
                    f"edgekit {__version__}): {what}")  # fmt: skip
                return cache, report
        if importlib.util.find_spec("edgekit_converters") is None:
            msg = (
                "`edgekit demo` converts the example with `edgekit convert`, which needs edgekit-ml-converters: "
                "pip install ./converters (or run scripts/setup)"
            )
            raise MissingDependencyError(msg)
        part = cache.with_name(f".{cache.name}.part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        log = self.work / "convert.log"
        log.unlink(missing_ok=True)
        say(f"1/7 convert: {self.rel(example / 'model.keras')} for {' and '.join(PROFILES)} as v1 "
            f"(about half a minute; cached for the next run; log {self.rel(log)})")  # fmt: skip
        args = [*_edgekit(), "convert", str(example / "model.keras"), *(a for p in PROFILES for a in ("--profile", p)),
                "--calibration", str(example / "calibration.npy"), "--validation", str(example / "validation.npz"),
                "--version", "1", "-o", str(part), "--json"]  # fmt: skip
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        started = time.monotonic()
        with (part / "convert.json").open("wb") as out:
            child = self.children.start("edgekit convert", args, log, stop_s=10.0, env=env, stdout=out)
            code = child.proc.wait()
        self.children.items.remove(child)
        if code != 0:
            msg = f"edgekit convert failed (exit {code}): {_tail(log) or 'no message'}; the whole log is {log}"
            raise ConversionError(msg)
        report = json.loads((part / "convert.json").read_text())
        what = self._converted(report)
        shutil.rmtree(cache, ignore_errors=True)
        part.rename(cache)
        say(f"1/7 convert: done in {time.monotonic() - started:.0f} s: {what}; cached in {self.rel(cache)}")
        return cache, report

    @staticmethod
    def _converted(report: dict[str, Any]) -> str:
        parts = []
        by_name = {p["profile"]: p for p in report["profiles"]}
        for name in PROFILES:
            p = by_name[name]
            m = p["metrics"]
            parts.append(
                f"{name} {p['format']} {p['quantization']} {_kb(int(p['size_bytes']))}, accuracy "
                f"{m['accuracy_converted']:.1f}% (Keras {m['accuracy_source']:.1f}%)"
            )
        return "; ".join(parts)

    # 2. sign, 3. v2

    def sign_and_make_v2(self, cache: Path) -> dict[int, list[Path]]:
        from edgekit_runtime.bundle import read_bundle
        from edgekit_runtime.signing import generate_keys, load_signing_key, sign_bundle

        private, public = generate_keys(self.keys)
        key = load_signing_key(private)
        self.public_key = public
        out: dict[int, list[Path]] = {1: [], 2: []}
        for profile in PROFILES:
            b = read_bundle(cache / f"{MODEL}-{profile}.ekb")
            b = dataclasses.replace(b, signature=sign_bundle(b, key))
            out[1].append(b.write(self.work / "bundles" / "v1" / f"{MODEL}-{profile}.ekb"))
        say(f"2/7 sign: a new key {key.public.id} ({self.rel(private)}; the hub and devices trust "
            f"{self.rel(public)}); signed v1 for {' and '.join(PROFILES)}")  # fmt: skip
        notes = []
        for path in out[1]:
            b = read_bundle(path)
            profile = b.manifest.profile.name if b.manifest.profile is not None else ""
            if b.manifest.format == "onnx":
                v1_model = b.model
                model = add_range_check(b.model, b.manifest.inputs[0].name)
                manifest = b.manifest.model_copy(
                    update={
                        "version": 2,
                        "model_sha256": hashlib.sha256(model).hexdigest(),
                        "model_size_bytes": len(model),
                    }
                )
                b = dataclasses.replace(b, manifest=manifest, manifest_bytes=b"", model=model, signature=None)
                notes.append(f"{profile}: {check_v2(b, v1_model, self.rows)}")
            else:
                manifest = b.manifest.model_copy(update={"version": 2})
                b = dataclasses.replace(b, manifest=manifest, manifest_bytes=b"", signature=None)
                notes.append(f"{profile}: the same model as v1, with version 2")
            b = dataclasses.replace(b, signature=sign_bundle(b, key))
            out[2].append(b.write(self.work / "bundles" / "v2" / path.name))
        say("3/7 v2: " + "; ".join(notes) + "; both signed")
        return out

    # 4. hub and devices

    def start_hub(self) -> None:
        port = 0 if self.port is None else self.port
        args = [*_edgekit(), "hub", "serve", "--data", str(self.hub_data), "--http", f"127.0.0.1:{port}",
                "--embedded-broker", "--broker-port", "0", "--trust-key", str(self.public_key)]  # fmt: skip
        self.hub = self.children.start("hub", args, self.hub_log, stop_s=HUB_STOP_S)
        found = self._announced(self.hub, {"hub": _HUB_LINE, "broker": _BROKER_LINE})
        self.hub_url, self.broker_url = found["hub"], found["broker"]
        self.token = (self.hub_data / "token").read_text().strip()

    def _announced(self, child: Child, patterns: dict[str, re.Pattern[str]]) -> dict[str, str]:
        """The first match of each pattern in the child's log, waiting for it (bounded)."""
        end = time.monotonic() + START_S
        found: dict[str, str] = {}
        while True:
            try:
                text = child.log.read_text(errors="replace")
            except OSError:
                text = ""
            for line in text.splitlines():
                for what, pattern in patterns.items():
                    m = pattern.search(line)
                    if m and what not in found:
                        found[what] = m.group(1)
            if len(found) == len(patterns):
                return found
            if not child.alive():
                why = _tail(child.log) or f"exit {child.proc.returncode}"
                msg = f"{child.name} did not start: {why} (log: {child.log})"
                raise UnavailableError(msg)
            if time.monotonic() > end:
                msg = f"{child.name} did not say where it listens within {START_S:g} s; see {child.log}"
                raise UnavailableError(msg)
            time.sleep(0.1)

    def start_devices(self) -> None:
        for device, profile, site in DEVICES:
            folder = self.device_dir(device)
            args = [sys.executable, "-m", "edgekit_runtime", "serve", str(folder / "store"), "--port", "0",
                    "--broker", self.broker_url, "--device-id", device, "--profile", profile,
                    "--trust-key", str(self.public_key), "--label", f"site={site}",
                    "--telemetry-interval", "2"]  # fmt: skip
            self.devices[device] = self.children.start(device, args, folder / "serve.log", stop_s=DEVICE_STOP_S)
        for device, child in self.devices.items():
            self.device_urls[device] = self._announced(child, {"url": _DEVICE_LINE})["url"]
        self._wait(self._registered, "the four devices to register with the hub", START_S)
        listed = ", ".join(f"{d} ({p}, site={s}, {self.device_urls[d]})" for d, p, s in DEVICES)
        say(f"4/7 hub: {self.hub_url} (embedded MQTT broker {self.broker_url}, SQLite in "
            f"{self.rel(self.hub_data)}, log {self.rel(self.hub_log)}); devices online: {listed}; "
            f"their logs are {self.rel(self.work / 'devices')}/ID/serve.log")  # fmt: skip

    def _registered(self) -> bool:
        with self.client() as client:
            found = {d["id"]: d for d in client.devices()}
        return all(i in found and found[i]["online"] and found[i]["profile"] for i, _, _ in DEVICES)

    def client(self) -> Any:
        from edgekit.hub.client import HubClient

        return HubClient(url=self.hub_url, token=self.token, timeout=30.0)

    def _wait(self, predicate: Callable[[], Any], what: str, timeout: float, every: float = 0.3) -> Any:
        end = time.monotonic() + timeout
        while True:
            self._check_children()
            value = predicate()
            if value:
                return value
            if time.monotonic() > end:
                msg = f"timed out after {timeout:g} s waiting for {what}; see {self.hub_log} and the device logs"
                raise UnavailableError(msg)
            time.sleep(every)

    def _check_children(self) -> None:
        for child in [c for c in (self.hub, *self.devices.values()) if c is not None]:
            if not child.alive():
                msg = f"{child.name} exited (code {child.proc.returncode}): {_tail(child.log)} (log: {child.log})"
                raise EdgekitError(msg)

    # 5. v1, traffic; 6. v2 in waves

    def cli(self, *args: str) -> str:
        """Run `edgekit ARGS` against the hub; its stdout. A failure is its last line."""
        log = self.work / "cli.log"
        with log.open("ab") as err:
            done = subprocess.run(
                [*_edgekit(), *args], stdout=subprocess.PIPE, stderr=err, env=self.env(), timeout=120, check=False
            )
        if done.returncode != 0:
            msg = f"edgekit {' '.join(args[:2])} failed (exit {done.returncode}): {_tail(log)}"
            raise EdgekitError(msg)
        return done.stdout.decode()

    def push(self, bundles: list[Path]) -> str:
        pushed = json.loads(self.cli("push", *map(str, bundles), "--json"))
        return ", ".join(f"{b['bundle']['profile']} {_kb(int(b['bundle']['size_bytes']))}" for b in pushed)

    def deploy_v1(self, bundles: list[Path]) -> None:
        sizes = self.push(bundles)
        started = time.monotonic()
        rollout_id = self.cli("deploy", f"{MODEL}:1", "--to", "all").strip()
        done = self.follow(rollout_id, quiet=True)
        if done["state"] != "completed":
            why = "; ".join(f"{d['device']} {d['state']} {d['reason']}".strip() for d in done["devices"])
            msg = f"the rollout of v1 ended {done['state']}: {done.get('reason') or why}; see the device logs"
            raise EdgekitError(msg)
        say(f"5/7 v1: pushed ({sizes}); rollout {rollout_id} to all completed in {time.monotonic() - started:.0f} s: "
            f"{len(done['devices'])} devices serve {MODEL} v1")  # fmt: skip

    def start_traffic(self) -> None:
        self._write_requests(self.rows[0])
        self.traffic = Traffic(self.device_urls, self.rows)
        self.traffic.start()
        self.reporter = Reporter(self.traffic, 15.0)
        self.reporter.start()
        say(f"  traffic: {RATE:g} requests/s to each device (TF Serving :predict to the Pis, Open Inference "
            f"Protocol v2 to jetson-1), one jetson-1 request in {BAD_EVERY} with pixel values 0-255 "
            "(a camera that sends 0-255; the model expects 0-1)")  # fmt: skip

    def _write_requests(self, row: Any) -> None:
        values = [round(float(v), 4) for v in row]
        (self.work / "request.json").write_text(json.dumps({"instances": [values]}) + "\n")
        (self.work / "request-0-255.json").write_text(json.dumps({"instances": [[v * 255 for v in values]]}) + "\n")

    def deploy_v2(self, bundles: list[Path]) -> None:
        sizes = self.push(bundles)
        rollout_id = self.cli(
            "deploy", f"{MODEL}:2", "--to", _V2_TO, "--waves", WAVES, "--health-window", HEALTH_WINDOW,
            "--abort-failure-rate", ABORT_FAILURE_RATE,
        ).strip()  # fmt: skip
        self.rollout_v2 = rollout_id
        say(f"6/7 v2: pushed ({sizes}); rollout {rollout_id}: waves {WAVES} over {_V2_TO} (pi-1 first), health "
            f"window {HEALTH_WINDOW} on each device, abort past {ABORT_FAILURE_RATE}% failed")  # fmt: skip
        started = time.monotonic()
        done = self.follow(rollout_id, quiet=False)
        took = time.monotonic() - started
        states = ", ".join(f"{d['device']} {d['state']} (serves v{d['active']})" for d in done["devices"])
        say(f"  rollout {rollout_id} {done['state']} in {took:.0f} s{': ' + done['reason'] if done['reason'] else ''}"
            f" - {states}")  # fmt: skip
        for d in done["devices"]:
            if d["state"] != "succeeded" and d["reason"]:
                say(f"  {d['device']} {d['state']}: {d['reason']}")
        if self.traffic is not None:
            say("  " + self.traffic.line())

    def follow(self, rollout_id: str, *, quiet: bool) -> dict[str, Any]:
        """Poll the rollout until it ends; unless ``quiet``, one line per change of wave or device state."""
        last = None
        end = time.monotonic() + ROLLOUT_S
        with self.client() as client:
            while True:
                self._check_children()
                s: dict[str, Any] = client.rollout(rollout_id)
                waves = max((d["wave"] for d in s["devices"]), default=0)
                now = (s["state"], s["wave"], tuple((d["device"], d["state"]) for d in s["devices"]))
                if now != last and not quiet:
                    states = ", ".join(f"{d['device']} {d['state']}" for d in s["devices"])
                    say(f"  wave {s['wave']}/{waves} ({s['state']}): {states}")
                last = now
                if s["state"] in ("completed", "aborted", "cancelled"):
                    return s
                if time.monotonic() > end:
                    msg = f"rollout {rollout_id} did not end within {ROLLOUT_S:g} s; see {self.hub_log}"
                    raise UnavailableError(msg)
                time.sleep(0.5)

    # 7. what to look at

    def show(self) -> None:
        env = self.env()
        if not sys.stderr.isatty():
            env.setdefault("COLUMNS", "160")
        subprocess.run([*_edgekit(), "fleet"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       timeout=120, check=False)  # fmt: skip
        jetson = self.device_urls["jetson-1"].removeprefix("http://")
        pi = self.device_urls["pi-1"].removeprefix("http://")
        token_file = self.rel(self.hub_data / "token")
        tries = [
            f"export EDGEKIT_HUB={self.hub_url} EDGEKIT_HUB_TOKEN=$(cat {token_file})",
            "edgekit fleet; edgekit fleet show jetson-1; edgekit rollout list",
            f"edgekit rollout status {self.rollout_v2}; edgekit telemetry export --format csv -o t.csv",
            f"curl -s {pi}/v1/models/{MODEL}:predict -d @{self.rel(self.work / 'request.json')}",
            f"curl -s {jetson}/v1/models/{MODEL}:predict -d @{self.rel(self.work / 'request-0-255.json')}"
            "   # v1 answers 0-255 pixels (wrongly); v2 refused them",
        ]
        say("7/7 try next (in another shell):")
        for t in tries:
            say(f"  {t}")
        say(f"dashboard: {self.hub_url}/#token={self.token}")

    # the whole story

    def run(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.check()
        self.fresh()
        example = find_example()
        import numpy as np

        with np.load(example / "validation.npz") as data:
            self.rows = np.asarray(data["pixels"], dtype=np.float32)
        say(f"edgekit demo in {self.rel(self.work)} (hub, devices, keys and bundles made afresh; conversions cached)")
        cache, _ = self.convert(example)
        bundles = self.sign_and_make_v2(cache)
        self.start_hub()
        self.start_devices()
        self.deploy_v1(bundles[1])
        self.start_traffic()
        self.deploy_v2(bundles[2])
        self.show()

    def wait(self) -> None:
        """Until a signal: traffic goes on; the traffic line now and then; a child that dies ends it."""
        if self.reporter is not None:
            self.reporter.halt.set()
        say("running until Ctrl-C (traffic goes on, so the dashboard stays live)")
        last = time.monotonic()
        while True:
            time.sleep(1.0)
            self._check_children()
            if self.traffic is not None and time.monotonic() - last >= 60:
                say("  " + self.traffic.line())
                last = time.monotonic()

    def close(self) -> None:
        for thread in (self.reporter, self.traffic):
            if thread is not None:
                thread.halt.set()
        if self.traffic is not None:
            self.traffic.stop()
        if self.children.items:
            names = [c.name for c in self.children.items if c.name != "hub"] + [
                c.name for c in self.children.items if c.name == "hub"
            ]  # the order they stop in
            say(f"stopping {', '.join(names)}")
            self.children.stop_all()
            logs = f"; logs in {self.rel(self.hub_log)} and {self.rel(self.work / 'devices')}/ID/serve.log"
            say("stopped" + (logs if self.hub is not None else ""))
        else:
            self.children.stop_all()


class _Signals:
    """SIGINT and SIGTERM raise Interrupted in the main thread, once: while the demo stops its
    processes (``armed`` False) a further signal is only noted, so the clean-up always finishes."""

    def __init__(self) -> None:
        self.armed = True
        self.original: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        self.original = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self.original.items():
            signal.signal(s, h)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """One demo per work folder at a time."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        lock = (work / ".demo.lock").open("a+")
    except OSError as e:
        msg = f"cannot use {work} as the demo's folder: {e.strerror or e}; give another with --workdir DIR"
        raise InvalidInputError(msg) from None
    with lock as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            msg = f"another edgekit demo runs in {work}: stop it (Ctrl-C) or give another --workdir"
            raise UnavailableError(msg) from None
        yield


def add_range_check(model_bytes: bytes, input_name: str) -> bytes:
    """The ONNX model with its input checked first: Cast(x -> int64) indexes a TABLE_ROWS-row table
    of zeros (Gather, axis 0), whose ReduceSum (all axes, keepdims 0) is added to x; the original
    graph reads that sum. Values 0 to TABLE_ROWS - 1 answer exactly as before (x + 0.0); larger ones
    make ONNX Runtime fail the request (an index out of range)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    checked = f"{input_name}_range_checked"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = checked
    for out in graph.output:
        if out.name == input_name:  # pragma: no cover - a model that echoes its input
            msg = f"the model's input {input_name!r} is also an output; the range check needs a model that uses it"
            raise InvalidInputError(msg)
    table = numpy_helper.from_array(np.zeros(TABLE_ROWS, dtype=np.float32), "range_check_table")
    nodes = [
        helper.make_node("Cast", [input_name], ["range_check_index"], to=TensorProto.INT64, name="range_check_cast"),
        helper.make_node(
            "Gather",
            ["range_check_table", "range_check_index"],
            ["range_check_zeros"],
            axis=0,
            name="range_check_gather",
        ),
        helper.make_node("ReduceSum", ["range_check_zeros"], ["range_check_zero"], keepdims=0, name="range_check_sum"),
        helper.make_node("Add", [input_name, "range_check_zero"], [checked], name="range_check_add"),
    ]
    graph.initializer.append(table)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def check_v2(bundle: Any, v1_model: bytes, rows: Any) -> str:
    """Load the v2 ONNX model with the runtime's backend: its golden samples still match; it answers
    ``rows`` (in range) exactly as the v1 model does; a request with pixel values 0-255 fails in the
    engine. A one-line summary."""
    import numpy as np
    import onnxruntime

    from edgekit_runtime.backends import load_backend
    from edgekit_runtime.errors import SmokeTestError
    from edgekit_runtime.model import check_golden

    backend = load_backend("onnx", bundle.model)
    try:
        golden = check_golden(bundle, backend)
    except SmokeTestError as e:
        msg = f"the v2 ONNX model with the range check fails its golden samples: {e.message}"
        raise EdgekitError(msg) from e
    name = bundle.manifest.inputs[0].name
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # the refusal is what we check for: no ONNX Runtime error line on stderr
    cpu = ["CPUExecutionProvider"]
    v1 = onnxruntime.InferenceSession(v1_model, options, providers=cpu)
    v2 = onnxruntime.InferenceSession(bundle.model, options, providers=cpu)
    x = np.asarray(rows, dtype=np.float32)
    if not all(np.array_equal(a, b) for a, b in zip(v1.run(None, {name: x}), v2.run(None, {name: x}), strict=True)):
        msg = "the v2 ONNX model with the range check answers in-range inputs differently from v1"
        raise EdgekitError(msg)
    refused = False
    try:
        v2.run(None, {name: x[:1] * 255.0})
    except Exception:  # noqa: BLE001 - ONNX Runtime's own error type: what we want here
        refused = True
    if not refused:
        msg = "the v2 range check did not refuse pixel values 0-255 (ONNX Runtime answered them)"
        raise EdgekitError(msg)
    return (
        f"an input range check (Cast to int64, Gather on a {TABLE_ROWS}-row zero table, ReduceSum, added to "
        f"{name}: values of {TABLE_ROWS} or more fail in ONNX Runtime), {_kb(len(bundle.model))}; {golden}; "
        f"the {len(x)} validation rows answered exactly as by v1; pixels 0-255 refused"
    )


@click.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("edgekit-demo"),
    show_default=True,
    help="the demo's folder: conversion cache (kept), keys, bundles, hub data, device stores and logs (made afresh)",
)
@click.option("--port", type=click.IntRange(1, 65535), help="the hub's HTTP port (default: a free one)")
@click.option("--no-wait", is_flag=True, help="stop everything after the last step instead of running until Ctrl-C")
@click.pass_context
def demo(ctx: click.Context, workdir: Path, port: int | None, no_wait: bool) -> None:
    """The whole story on this machine: convert the bundled digits example for a Raspberry Pi and a
    Jetson, sign it, start a hub (embedded MQTT broker, SQLite) and four simulated devices, deploy
    v1, send live traffic, roll a v2 out in waves (the Jetson fails its health window and goes back
    to v1 by itself), print the dashboard's address, and run until Ctrl-C.

    Exit 0 once the story finished (after Ctrl-C ended the wait, or with --no-wait); 130 when
    interrupted before."""
    story = Demo(workdir, port)
    finished = False
    with _Signals() as signals:
        try:
            with _locked(story.work):
                try:
                    story.run()
                    finished = True
                    if not no_wait:
                        story.wait()
                except (Interrupted, KeyboardInterrupt) as e:
                    signals.armed = False
                    why = str(e) or "SIGINT"
                    say(f"{why}: stopping" + ("" if finished else " before the story finished (exit 130)"))
                finally:
                    signals.armed = False
                    story.close()
        except (Interrupted, KeyboardInterrupt):  # a signal outside the inner block: nothing more to say
            pass
        finally:
            signals.armed = False
            story.close()  # again: harmless, and complete if a signal cut the first one short
    ctx.exit(0 if finished else 130)
