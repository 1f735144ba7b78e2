"""Fixtures of the hub's tests: signing keys, tiny signed ONNX bundles per profile (onnx.helper, no
TensorFlow), a store on a real SQLite file, and on the real PostgreSQL when it is reachable."""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgekit.hub.artifacts import Artifacts
from edgekit.hub.registry import Registry
from edgekit.hub.store import Store, database_url
from edgekit_runtime.bundle import ProfileRef, RuntimeSettings, read_bundle
from edgekit_runtime.signing import PublicKey, SigningKey, generate_keys, load_public_key, load_signing_key, sign_bundle
from tests.runtime import models

#: The machine's PostgreSQL (trust auth); tests make and drop their own database in it.
PG_ADMIN_URL = os.environ.get("EDGEKIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@dataclasses.dataclass(frozen=True)
class Keys:
    private: SigningKey
    public: PublicKey
    private_path: Path
    public_path: Path


def make_keys(folder: Path) -> Keys:
    private, public = generate_keys(folder)
    return Keys(load_signing_key(private), load_public_key(public), private, public)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def other_keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "other-keys")


def onnx_model(seed: int = 0, features: int = 64) -> bytes:
    """float32[-1, features] -> softmax(x W) over 10 classes; ``features`` sets the size (40 B each)."""
    w = np.random.default_rng(seed).normal(size=(features, 10)).astype(np.float32) / 16
    return models.onnx_softmax(w)


def make_bundle(
    path: Path,
    *,
    name: str = "digits",
    version: int = 1,
    profile: str = "raspberrypi",
    key: SigningKey | None = None,
    seed: int = 0,
    features: int = 64,
) -> Path:
    """A real ONNX bundle for ``profile`` (golden samples included), signed with ``key`` if given."""
    x = np.random.default_rng(seed).normal(size=(2, features)).astype(np.float32)
    models.make_bundle(
        path, name=name, version=version, fmt="onnx", model=onnx_model(seed, features), golden_in={"x": x}
    )
    b = read_bundle(path)
    manifest = b.manifest.model_copy(update={"profile": ProfileRef(name=profile, runtime=RuntimeSettings())})
    b = dataclasses.replace(b, manifest=manifest, manifest_bytes=b"")
    if key is not None:
        b = dataclasses.replace(b, signature=sign_bundle(b, key))
    b.write(path)
    return path


BundleFactory = Callable[..., Path]


@pytest.fixture
def bundle(tmp_path: Path, keys: Keys) -> BundleFactory:
    """``bundle(name=, version=, profile=, seed=, signed=True)``: a signed bundle file in tmp_path."""
    counter = iter(range(1_000_000))

    def make(*, signed: bool = True, key: SigningKey | None = None, **kw: object) -> Path:
        path = tmp_path / "bundles" / f"b{next(counter)}.ekb"
        return make_bundle(path, key=(key or keys.private) if signed else None, **kw)  # type: ignore[arg-type]

    return make


# -- stores -----------------------------------------------------------------------------------


def _pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not (the skip reason)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'edgekit-ml[postgresql]')"
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except psycopg.Error as e:
        return f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {str(e).strip().splitlines()[0]}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database of this test's own (dropped afterwards), as a --db URL."""
    why = _pg_reachable()
    if why is not None:
        pytest.skip(why)
    import psycopg

    name = f"edgekit_hub_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store's database: a SQLite file, then the real PostgreSQL (skipped when unreachable)."""
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    url: str = request.getfixturevalue("pg_url")
    return database_url(url, tmp_path)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


@pytest.fixture
def registry(store: Store, tmp_path: Path, keys: Keys) -> Registry:
    return Registry(store, Artifacts(tmp_path / "artifacts"), [keys.public])


# -- a real `edgekit hub serve` process --------------------------------------------------------

EDGEKIT = str(Path(sys.executable).parent / "edgekit")
_ANNOUNCE = re.compile(r"^edgekit hub on (http://\S+) \(data ")


class HubProcess:
    """`edgekit hub serve --data DATA --http 127.0.0.1:PORT ...` as a user starts it. Port 0 picks a
    free port; the URL is read from the line the hub prints. stderr is drained by a thread."""

    def __init__(self, data: Path, *args: str, port: int = 0) -> None:
        self.data = data
        self.args = args
        self.port = port
        self.url = ""
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> HubProcess:
        cmd = [EDGEKIT, "hub", "serve", "--data", str(self.data), "--http", f"127.0.0.1:{self.port}", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        announced = threading.Event()

        def drain() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = _ANNOUNCE.match(line)
                if m:
                    self.url = m.group(1)
                    announced.set()
            announced.set()  # it exited

        threading.Thread(target=drain, daemon=True).start()
        announced.wait(60)
        if not self.url:
            self.stop()
            msg = "the hub did not start:\n" + "\n".join(self.lines)
            raise AssertionError(msg)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it and wait; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    @property
    def token(self) -> str:
        return (self.data / "token").read_text().strip()

    def env(self, *, token: bool = True) -> dict[str, str]:
        """The environment a user of this hub sets: EDGEKIT_HUB and EDGEKIT_HUB_TOKEN."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_HUB")}
        env["EDGEKIT_HUB"] = self.url
        if token:
            env["EDGEKIT_HUB_TOKEN"] = self.token
        return env


def edgekit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `edgekit` command as a user would; stdout and stderr apart."""
    return subprocess.run([EDGEKIT, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """``hub_factory(*args, data=None)``: a started hub (``--trust-key`` and the like in args)."""
    started: list[HubProcess] = []

    def start(*args: str, data: Path | None = None, port: int = 0) -> HubProcess:
        hub = HubProcess(data or tmp_path / "hub", *args, port=port).start()
        started.append(hub)
        return hub

    yield start
    for hub in started:
        if hub.proc is not None and hub.proc.poll() is None:
            hub.stop()
