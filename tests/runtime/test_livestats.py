"""The telemetry interval window (livestats.py): exact counts, take() handing over and starting afresh,
latency percentiles (exact below the reservoir size, a bounded uniform sample above it), the output
summary (a class histogram, or numeric figures), and the same counts through a real served model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.livestats import _OUTPUT_RESERVOIR, RESERVOIR, Window, error_kind, looks_like_scores, top_classes
from edgekit_runtime.server import create_app
from tests.runtime.conftest import Client


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


# -- counts -------------------------------------------------------------------------------------


def test_error_kinds_name_the_http_status() -> None:
    assert error_kind(400) == "invalid_input"
    assert error_kind(404) == "not_found"
    assert error_kind(413) == "too_large"
    assert error_kind(503) == "unavailable"
    assert error_kind(504) == "timeout"
    assert error_kind(500) == "internal"
    assert error_kind(502) == "internal"
    assert error_kind(422) == "client"
    assert error_kind(429) == "client"


def test_requests_and_errors_are_counted_exactly_by_kind() -> None:
    clock = Clock(1000.0)
    w = Window("m", 3, clock=clock)
    statuses: list[int | None] = [None] * 7 + [400] * 3 + [503] * 4 + [500, 502] + [404] + [504] * 2 + [429]
    for s in statuses:
        w.request(s)
    for rows in (1, 4, 4, 8, 1):
        w.batch(rows)
    clock.now = 1010.0
    fig = w.take()
    assert fig["model"] == "m"
    assert fig["version"] == 3
    assert fig["requests"] == len(statuses) == 20
    assert fig["errors"] == 13
    assert fig["errors_by_kind"] == {
        "invalid_input": 3,
        "unavailable": 4,
        "internal": 2,
        "not_found": 1,
        "timeout": 2,
        "client": 1,
    }
    assert fig["rejected"] == 4  # the 503s
    assert fig["rows"] == 18
    assert fig["rows_per_s"] == pytest.approx(1.8)
    assert fig["batch_sizes"] == {"1": 2, "4": 2, "8": 1}
    assert fig["interval_start"] == 1000.0
    assert fig["interval_end"] == 1010.0
    assert fig["p50_ms"] is None and fig["p95_ms"] is None and fig["p99_ms"] is None  # no latency observed
    assert "outputs" not in fig  # no answer was summarised


def test_take_starts_afresh_and_intervals_are_contiguous() -> None:
    clock = Clock(100.0)
    w = Window("m", 1, clock=clock)
    w.request(None)
    w.request(503)
    w.latency(0.01)
    w.batch(2)
    w.outputs({"y": np.array([[1.0, 2.0]])})
    clock.now = 110.0
    first = w.take()
    assert first["requests"] == 2 and first["errors"] == 1 and first["rows"] == 2
    assert first["interval_start"] == 100.0 and first["interval_end"] == 110.0

    clock.now = 120.0
    second = w.take()  # nothing happened since: an empty interval, right after the first
    assert second["interval_start"] == first["interval_end"]
    assert second["interval_end"] == 120.0
    assert second["requests"] == 0
    assert second["errors"] == 0
    assert second["errors_by_kind"] == {}
    assert second["rejected"] == 0
    assert second["rows"] == 0
    assert second["rows_per_s"] == 0
    assert second["batch_sizes"] == {}
    assert second["p50_ms"] is None
    assert "outputs" not in second

    w.request(None)
    third = w.take(now=125.5)  # an explicit end works the same
    assert third["interval_start"] == second["interval_end"] == 120.0
    assert third["interval_end"] == 125.5
    assert third["requests"] == 1
    assert w.take(now=130.0)["interval_start"] == 125.5


def test_concurrent_requests_are_all_counted() -> None:
    import threading

    w = Window("m", 1)
    per_thread = 2000

    def work() -> None:
        for i in range(per_thread):
            w.request(None if i % 4 else 400)
            w.latency(0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fig = w.take()
    assert fig["requests"] == 8 * per_thread
    assert fig["errors_by_kind"] == {"invalid_input": 8 * per_thread // 4}


# -- latency ------------------------------------------------------------------------------------


def test_latency_percentiles_are_exact_below_the_reservoir_size() -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=-5, sigma=1, size=RESERVOIR - 1)  # seconds
    w = Window("m", 1)
    for v in values:
        w.latency(float(v))
    fig = w.take()
    expected = np.quantile(values * 1000.0, (0.5, 0.95, 0.99))
    assert fig["p50_ms"] == pytest.approx(expected[0], abs=1e-4)  # rounded to 4 decimals
    assert fig["p95_ms"] == pytest.approx(expected[1], abs=1e-4)
    assert fig["p99_ms"] == pytest.approx(expected[2], abs=1e-4)
    assert fig["p50_ms"] < fig["p95_ms"] < fig["p99_ms"]


def test_latency_percentiles_of_known_values() -> None:
    w = Window("m", 1)
    for ms in range(1, 101):  # 1 .. 100 ms
        w.latency(ms / 1000.0)
    fig = w.take()
    want = np.quantile(np.arange(1, 101, dtype=np.float64), (0.5, 0.95, 0.99))
    assert [fig["p50_ms"], fig["p95_ms"], fig["p99_ms"]] == pytest.approx(list(want), abs=1e-4)
    assert fig["p50_ms"] == pytest.approx(50.5, abs=1e-4)


def test_the_latency_reservoir_is_bounded_and_a_uniform_sample() -> None:
    n = 20 * RESERVOIR
    w = Window("m", 1)
    # an increasing stream: a sample that kept only the first (or last) values would be far off
    for i in range(n):
        w.latency(i / n)  # 0 .. 1 s
    assert len(w.latencies.values) <= RESERVOIR
    assert w.latencies.seen == n
    fig = w.take()
    assert 400 < fig["p50_ms"] < 600  # the true median is 500 ms; a uniform sample of 2048 is within ~3 %
    assert 900 < fig["p95_ms"] <= 1000
    assert len(w.latencies.values) == 0  # take() started a new sample


# -- outputs ------------------------------------------------------------------------------------


def test_looks_like_scores() -> None:
    p = softmax(np.random.default_rng(0).normal(size=(4, 5))).astype(np.float32)
    assert looks_like_scores(p)
    assert not looks_like_scores(p.astype(np.float64)[:, :1])  # one column
    assert not looks_like_scores(p[0])  # one dimension
    assert not looks_like_scores((p * 2).astype(np.float32))  # rows sum to 2
    assert not looks_like_scores(np.array([[0.5, 0.6, -0.1]]))  # a negative value
    assert not looks_like_scores(np.array([[1, 0]], dtype=np.int64))  # not floating point
    assert not looks_like_scores(np.array([[np.nan, 1.0]]))
    assert not looks_like_scores(np.zeros((0, 3), dtype=np.float32))


def test_top_classes() -> None:
    p = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]], dtype=np.float32)
    assert top_classes({"probs": p}, "probs").tolist() == [1, 0]  # type: ignore[union-attr]
    assert top_classes({"logits": p * 5}, "logits") is None  # not probabilities
    top = np.array([[4, 1], [2, 4]])
    assert top_classes({"top_k_indices": top, "top_k_values": p[:, :2]}, "top_k_values").tolist() == [4, 2]  # type: ignore[union-attr]


def test_softmax_outputs_give_a_class_histogram() -> None:
    rng = np.random.default_rng(3)
    w = Window("m", 1, first_output="probs")
    expected: dict[str, int] = {}
    for n in (1, 5, 8, 3):
        p = softmax(rng.normal(size=(n, 6)) * 3).astype(np.float32)
        for c in p.argmax(axis=-1):
            expected[str(int(c))] = expected.get(str(int(c)), 0) + 1
        w.outputs({"probs": p, "other": np.ones((n, 2), dtype=np.float32)})
    fig = w.take()
    assert fig["outputs"]["kind"] == "classes"
    assert fig["outputs"]["requests"] == 4
    assert fig["outputs"]["classes"] == expected
    assert sum(fig["outputs"]["classes"].values()) == 1 + 5 + 8 + 3


def test_top_k_indices_outputs_give_a_class_histogram() -> None:
    w = Window("m", 1, first_output="top_k_values")
    w.outputs({"top_k_values": np.array([[0.9, 0.1], [0.5, 0.4]]), "top_k_indices": np.array([[7, 2], [3, 7]])})
    w.outputs({"top_k_values": np.array([[2.0, 1.0]]), "top_k_indices": np.array([[7, 0]])})  # values not probs
    fig = w.take()
    assert fig["outputs"] == {"kind": "classes", "requests": 2, "classes": {"3": 1, "7": 2}}


def test_numeric_outputs_give_exact_mean_std_min_max() -> None:
    rng = np.random.default_rng(11)
    w = Window("m", 1, first_output="y")
    ys = [rng.normal(loc=3, scale=2, size=(n, 3)).astype(np.float32) for n in (2, 7, 1)]
    zs = [rng.integers(-5, 50, size=(n,)) for n in (2, 7, 1)]
    for y, z in zip(ys, zs, strict=True):
        w.outputs({"y": y, "z": z})
    fig = w.take()
    out = fig["outputs"]
    assert out["kind"] == "numeric"
    assert out["requests"] == 3
    assert set(out["outputs"]) == {"y", "z"}
    for name, parts in (("y", ys), ("z", zs)):
        allv = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in parts])
        s = out["outputs"][name]
        assert s["count"] == allv.size
        assert s["mean"] == pytest.approx(float(allv.mean()), rel=1e-9, abs=1e-12)
        assert s["std"] == pytest.approx(float(allv.std()), rel=1e-6)
        assert s["min"] == float(allv.min())
        assert s["max"] == float(allv.max())
        # below the output reservoir's size, the quantiles are those of every value
        qs = np.quantile(allv, (0.05, 0.25, 0.5, 0.75, 0.95))
        assert [s["quantiles"][k] for k in ("p05", "p25", "p50", "p75", "p95")] == pytest.approx(list(qs))


def test_numeric_summary_skips_non_finite_values() -> None:
    w = Window("m", 1)
    w.outputs({"y": np.array([1.0, np.nan, 3.0, np.inf, -np.inf])})
    s = w.take()["outputs"]["outputs"]["y"]
    assert s["count"] == 2
    assert s["mean"] == 2.0
    assert s["min"] == 1.0 and s["max"] == 3.0


def test_numeric_quantiles_of_a_long_stream_stay_plausible() -> None:
    w = Window("m", 1)
    n, per = 400, 100
    for i in range(n):  # 40,000 increasing values in [0, 1): the quantiles come from a uniform sample
        w.outputs({"y": (np.arange(per) + i * per) / (n * per)})
    assert len(w.numeric["y"].sample.values) <= _OUTPUT_RESERVOIR
    s = w.take()["outputs"]["outputs"]["y"]
    assert s["count"] == n * per
    assert s["mean"] == pytest.approx(0.5, abs=1e-3)
    assert 0.35 < s["quantiles"]["p50"] < 0.65
    assert s["quantiles"]["p05"] < s["quantiles"]["p50"] < s["quantiles"]["p95"]


def test_a_mixed_interval_reports_the_numeric_requests() -> None:
    w = Window("m", 1, first_output="probs")
    w.outputs({"probs": np.array([[0.2, 0.8]], dtype=np.float32)})  # classes
    w.outputs({"probs": np.array([[2.0, 8.0]], dtype=np.float32)})  # not probabilities: numeric
    w.outputs({"probs": np.array([[0.9, 0.1]], dtype=np.float32)})  # classes
    out = w.take()["outputs"]
    assert out["kind"] == "numeric"
    assert out["requests"] == 1
    y = out["outputs"]["probs"]
    assert y["count"] == 2  # only the numeric request's values
    assert y["min"] == 2.0 and y["max"] == 8.0 and y["mean"] == 5.0
    # the next interval starts with neither
    w.outputs({"probs": np.array([[0.9, 0.1]], dtype=np.float32)})
    assert w.take()["outputs"] == {"kind": "classes", "requests": 1, "classes": {"0": 1}}


@pytest.mark.parametrize(
    "outputs",
    [
        {"label": np.array(["cat", "dog"])},
        {"label": ["cat", "dog"]},
        {"ragged": [[1.0, 2.0], [3.0]]},
        {"top_k_indices": np.array([["a", "b"]])},
        {"obj": object()},
        {"none": None},
        {},
    ],
    ids=["np-strings", "list-strings", "ragged", "string-top-k", "object", "none", "empty"],
)
def test_outputs_never_raises_and_summarises_no_numbers_from_them(outputs: dict[str, object]) -> None:
    w = Window("m", 1)
    w.outputs(outputs)  # must not raise
    w.request(None)
    fig = w.take()
    assert fig["requests"] == 1
    summary = fig.get("outputs")
    assert summary is None or summary["kind"] == "classes" or summary["outputs"] == {}


def test_string_outputs_next_to_numbers_keep_the_numbers() -> None:
    w = Window("m", 1)
    w.outputs({"label": np.array(["cat", "dog"]), "score": np.array([0.25, 0.75])})
    out = w.take()["outputs"]
    assert out["kind"] == "numeric"
    assert set(out["outputs"]) == {"score"}
    assert out["outputs"]["score"]["mean"] == 0.5


# -- through a served model --------------------------------------------------------------------


@pytest.fixture
def served(bundles: dict[str, Path]) -> Iterator[tuple[Runtime, Client]]:
    rt = Runtime([bundles["mlp"]])
    rt.start(poll_seconds=0)
    c = Client(create_app(rt))
    yield rt, c
    c.close()
    rt.close()


def test_requests_over_http_show_up_exactly_in_the_window(served: tuple[Runtime, Client]) -> None:
    rt, client = served
    (window,) = [w for w in rt.metrics.windows() if (w.model, w.version) == ("mlp", 1)]
    window.take()  # whatever loading did (golden samples) is not this test's traffic
    x = np.random.default_rng(5).normal(size=(8, 4)).astype(np.float32)
    sizes = [1, 2, 8, 4, 1, 4, 4]  # powers of two: LiteRT batches are cut to those (batching.py)
    for n in sizes:
        r = client.post("/v1/models/mlp:predict", json={"instances": x[:n].tolist()})
        assert r.status_code == 200, r.text
    for _ in range(3):  # wrong feature count: 400
        assert client.post("/v1/models/mlp:predict", json={"instances": [[1.0, 2.0]]}).status_code == 400
    assert client.post("/v2/models/mlp/infer", content=b"{not json").status_code == 400
    fig = window.take()
    assert fig["requests"] == len(sizes) + 4
    assert fig["errors"] == 4
    assert fig["errors_by_kind"] == {"invalid_input": 4}
    assert fig["rejected"] == 0
    assert fig["rows"] == sum(sizes)
    assert fig["batch_sizes"] == {"1": 2, "2": 1, "4": 3, "8": 1}  # one request at a time: a batch each
    assert fig["p50_ms"] is not None and 0 < fig["p50_ms"] <= fig["p95_ms"] <= fig["p99_ms"]
    # the MLP's 3 logits are not probabilities: a numeric summary of every answered request
    assert fig["outputs"]["kind"] == "numeric"
    assert fig["outputs"]["requests"] == len(sizes)
    (name,) = fig["outputs"]["outputs"]
    assert fig["outputs"]["outputs"][name]["count"] == 3 * sum(sizes)
    again = window.take()
    assert again["requests"] == 0 and again["interval_start"] == fig["interval_end"]
