"""Fixtures of the runtime tests: small real models (Keras -> TFLite, onnx.helper), built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.runtime import models

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GOLDEN_X = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)


class Models:
    """Model files (bytes) and the Keras reference of the float MLP."""

    def __init__(self, root: Path) -> None:
        keras_model = models.keras_mlp(seed=0)
        self.reference = keras_model
        self.mlp = models.to_tflite(keras_model, root / "mlp")
        self.mlp_fixed1 = models.to_tflite(keras_model, root / "mlp1", fixed_batch=1)
        self.mlp_int8 = models.to_tflite(keras_model, root / "mlp8", int8=True)
        self.mlp_v2 = models.to_tflite(models.keras_mlp(seed=1), root / "mlp_v2")
        self.two = models.onnx_two_in_two_out()
        self.mlp_golden_out = {"output_0": np.asarray(keras_model(GOLDEN_X)).astype(np.float32)}


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def bundles(model_files: Models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles of every test model, with golden samples. Keys: mlp, mlp_v2, mlp_bad, fixed1, int8, two."""
    return make_bundles(model_files, tmp_path_factory.mktemp("bundles"))


def make_bundles(m: Models, d: Path) -> dict[str, Path]:
    """The ``bundles`` fixture's bundles, written into ``d`` (scripts/fuzz serves them too)."""
    batching = {"max_batch_size": 8, "batch_timeout_micros": 0, "allowed_batch_sizes": [], "max_enqueued_batches": 64}
    return {
        "mlp": models.make_bundle(
            d / "mlp-1.ekb",
            name="mlp",
            version=1,
            fmt="tflite",
            model=m.mlp,
            golden_in={"x": GOLDEN_X},
            golden_out=m.mlp_golden_out,
            batching=batching,
        ),
        "mlp_v2": models.make_bundle(
            d / "mlp-2.ekb",
            name="mlp",
            version=2,
            fmt="tflite",
            model=m.mlp_v2,
            golden_in={"x": GOLDEN_X},
            batching=batching,
        ),
        "mlp_bad": models.make_bundle(
            d / "mlp-3-bad.ekb",
            name="mlp",
            version=3,
            fmt="tflite",
            model=m.mlp,
            golden_in={"x": GOLDEN_X},
            golden_out={"output_0": m.mlp_golden_out["output_0"] + 1.0},
            batching=batching,
        ),
        "fixed1": models.make_bundle(
            d / "fixed1.ekb",
            name="fixed1",
            version=1,
            fmt="tflite",
            model=m.mlp_fixed1,
            golden_in={"x": GOLDEN_X},
            golden_out=m.mlp_golden_out,
            batching=batching,
        ),
        "int8": models.make_bundle(
            d / "int8.ekb",
            name="int8",
            version=1,
            fmt="tflite",
            model=m.mlp_int8,
            quantization="int8",
            golden_in={"x": GOLDEN_X},
            golden_out=m.mlp_golden_out,
            atol=0.15,
            batching=batching,
        ),
        "two": models.make_bundle(
            d / "two.ekb",
            name="two",
            version=1,
            fmt="onnx",
            model=m.two,
            golden_in={"a": GOLDEN_X[:, :3], "b": GOLDEN_X[:, 1:]},
            batching=batching,
        ),
    }


def reference(model_files: Models, x: np.ndarray) -> np.ndarray:
    return np.asarray(model_files.reference(x), dtype=np.float32)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    s = tmp_path / "store"
    s.mkdir()
    yield s


class Client:
    """A synchronous in-process HTTP client of an ASGI app (httpx over ASGITransport on a loop thread)."""

    def __init__(self, app: object) -> None:
        import asyncio
        import threading

        import httpx

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")  # type: ignore[arg-type]

    def run(self, coro: object, timeout: float = 60) -> object:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def request(self, method: str, url: str, **kwargs: object):  # type: ignore[no-untyped-def]
        return self.run(self.http.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: object):  # type: ignore[no-untyped-def]
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: object):  # type: ignore[no-untyped-def]
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self.run(self.http.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
