"""Where a request's CPU goes inside the runtime, without sockets: each step of the v2 binary infer path
timed on its own, then whole requests through ``App.dispatch`` and the real batcher, 64 at a time.

The model is the small MLP of scenario 3 (64-256-256-10, float TFLite; built and cached like
``bench/serve.py`` does). What this cannot see is what sockets cost: compare ``srv CPU µs/req`` in
``bench/serve.py`` scenario 3 and ``bench/http_floor.py``.

    python bench/request_path.py            # 20,000 calls per step
    python bench/request_path.py --calls 2000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _models import MODELS, ensure_models, make_bundle
from serve import sample_input, v2_binary

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20_000, help="calls per timed step (default 20000)")
    args = p.parse_args()

    import uvloop

    from edgekit_runtime.runtime import Runtime
    from edgekit_runtime.server import v2
    from edgekit_runtime.server.app import create_app

    spec = MODELS["mlp-small"]
    model_dir = ensure_models(ROOT / "bench" / "results" / "models", [spec.name])[spec.name]
    bundle = make_bundle(model_dir, spec, "tflite", threads=2)
    name = f"{spec.name}-tflite"
    payload = v2_binary(name, "x", sample_input(spec)[1], "output_0")  # the body scenario 3 sends
    body = payload.body
    json_size = int(payload.headers["Inference-Header-Content-Length"])
    headers = {b"inference-header-content-length": str(json_size).encode()}

    runtime = Runtime([bundle])
    runtime.start(poll_seconds=0)
    app = create_app(runtime)
    lm = app.dp.model(name)
    n = args.calls
    python = sys.version.split()[0]
    print(f"# request path of {spec.describe()} (v2 binary, {len(body)} B), {n:,} calls per step; Python {python}")

    def step(label: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"{label:55s} {(time.perf_counter() - start) / n * 1e6:8.2f} µs", flush=True)

    feeds, doc, selection = v2.decode(body, json_size, lm)
    outputs = {"output_0": np.zeros((1, 10), np.float32)}
    metrics = lm.metrics
    assert metrics is not None
    step("decode the body (v2.decode)", lambda: v2.decode(body, json_size, lm))
    step("check and coerce the inputs (LoadedModel.prepare)", lambda: lm.prepare(feeds))
    step("encode the reply (v2.encode)", lambda: v2.encode(lm, outputs, doc, selection))
    step(
        "count and time it (Prometheus counter + histogram)",
        lambda: (metrics.requests.inc(), metrics.latency.observe(1e-3)),
    )

    async def read_body() -> bytes:
        return body

    async def measure() -> None:
        loop = asyncio.get_running_loop()

        async def noop() -> int:
            return 1

        rounds = max(1, n // 64)
        start = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*[loop.create_task(noop()) for _ in range(64)])
        per_task = (time.perf_counter() - start) / (rounds * 64) * 1e6
        print(f"{'an asyncio task per request (create, run, gather)':55s} {per_task:8.2f} µs")
        path = payload.path
        start = time.perf_counter()
        for _ in range(rounds):
            replies = await asyncio.gather(
                *[loop.create_task(app.dispatch("POST", path, headers.get, read_body)) for _ in range(64)]
            )
        wall = (time.perf_counter() - start) / (rounds * 64) * 1e6
        assert all(r.status == 200 for r in replies), [r.body[:200] for r in replies if r.status != 200]
        print(
            f"{'whole request via App.dispatch + batcher + engine, c=64':55s} {wall:8.2f} µs (wall clock per request)"
        )

    uvloop.run(measure())
    runtime.close()


if __name__ == "__main__":
    main()
