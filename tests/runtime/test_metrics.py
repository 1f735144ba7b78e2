"""The Prometheus metrics: exact counts of requests, errors, latency observations, batch rows and padding."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgekit_runtime import Runtime
from edgekit_runtime.config import BatchingOverrides
from edgekit_runtime.metrics import CONTENT_TYPE, Metrics
from edgekit_runtime.server import create_app
from tests.runtime.conftest import Client

X = np.random.default_rng(13).normal(size=(8, 4)).astype(np.float32)
MLP = {"model": "mlp", "version": "1"}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


@pytest.fixture
def served(bundles: dict[str, Path]) -> Iterator[tuple[Runtime, Client]]:
    """A fresh runtime (its own registry, so every count starts at 0) padding batches to 2, 4 or 8 rows."""
    rt = Runtime([bundles["mlp"]], batching=BatchingOverrides(allowed_batch_sizes=[2, 4, 8]))
    rt.start(poll_seconds=0)
    c = Client(create_app(rt))
    yield rt, c
    c.close()
    rt.close()


def test_each_request_is_counted_once_with_its_latency_and_its_batch(served: tuple[Runtime, Client]) -> None:
    _, client = served
    start = time.perf_counter()
    for n in (3, 1, 8):  # one after the other: each request is a batch of its own
        r = client.post("/v1/models/mlp:predict", json={"instances": X[:n].tolist()})
        assert r.status_code == 200, r.text
    elapsed = time.perf_counter() - start
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == CONTENT_TYPE
    text = r.text
    assert value(text, "edgekit_requests_total", **MLP) == 3
    assert value(text, "edgekit_request_latency_seconds_count", **MLP) == 3
    assert 0 < value(text, "edgekit_request_latency_seconds_sum", **MLP) <= elapsed  # inside what the client saw
    assert value(text, "edgekit_batch_size_count", **MLP) == 3
    assert value(text, "edgekit_batch_size_sum", **MLP) == 3 + 1 + 8  # rows before padding
    assert value(text, "edgekit_batch_size_bucket", le="1.0", **MLP) == 1
    assert value(text, "edgekit_batch_size_bucket", le="4.0", **MLP) == 2
    assert value(text, "edgekit_batch_padding_rows_total", **MLP) == 1 + 1  # 3 -> 4 and 1 -> 2
    assert value(text, "edgekit_queue_depth", **MLP) == 0
    assert not any(name == "edgekit_request_errors_total" for name, _ in samples(text))


def test_failed_requests_are_counted_by_status_and_as_requests(served: tuple[Runtime, Client]) -> None:
    _, client = served
    assert client.post("/v1/models/mlp:predict", json={"instances": [[1, 2]]}).status_code == 400
    assert client.post("/v2/models/mlp/infer", content=b"{not json").status_code == 400
    assert client.post("/v1/models/mlp:predict", json={"instances": X[:2].tolist()}).status_code == 200
    text = client.get("/metrics").text
    assert value(text, "edgekit_requests_total", **MLP) == 3
    assert value(text, "edgekit_request_errors_total", code="400", **MLP) == 2
    assert value(text, "edgekit_batch_size_count", **MLP) == 1  # the bad ones never reached a batch


def test_the_queue_depth_is_read_from_the_runtime_at_scrape_time() -> None:
    m = Metrics()
    depths = [("a", "1", 5), ("b", "2", 0)]
    m.set_queue_source(lambda: depths)
    text = m.render().decode()
    assert value(text, "edgekit_queue_depth", model="a", version="1") == 5
    assert value(text, "edgekit_queue_depth", model="b", version="2") == 0
    depths[0] = ("a", "1", 2)
    assert value(m.render().decode(), "edgekit_queue_depth", model="a", version="1") == 2
    # no source yet: the family is there, without samples
    assert "# TYPE edgekit_queue_depth gauge" in Metrics().render().decode()


def test_model_metrics_are_labelled_by_model_and_version() -> None:
    m = Metrics()
    mm = m.for_model("m", 3)
    mm.requests.inc()
    mm.errors_by_code(503).inc()
    mm.latency.observe(0.002)
    mm.on_batch(3, 3)  # no padding: nothing added
    mm.on_batch(5, 8)
    text = m.render().decode()
    labels = {"model": "m", "version": "3"}
    assert value(text, "edgekit_requests_total", **labels) == 1
    assert value(text, "edgekit_request_errors_total", code="503", **labels) == 1
    assert value(text, "edgekit_request_latency_seconds_bucket", le="0.0025", **labels) == 1
    assert value(text, "edgekit_request_latency_seconds_bucket", le="0.001", **labels) == 0
    assert value(text, "edgekit_batch_size_count", **labels) == 2
    assert value(text, "edgekit_batch_size_sum", **labels) == 8
    assert value(text, "edgekit_batch_padding_rows_total", **labels) == 3
    assert "_created" not in text  # disabled: they double the scrape for nothing


def test_the_metrics_describe_themselves() -> None:
    families = {f.name: f for f in text_string_to_metric_families(Metrics().render().decode())}
    assert families["edgekit_requests"].type == "counter"
    assert families["edgekit_request_latency_seconds"].type == "histogram"
    assert families["edgekit_batch_size"].type == "histogram"
    assert families["edgekit_batch_padding_rows"].type == "counter"
    assert families["edgekit_queue_depth"].type == "gauge"
    assert families["edgekit_queue_depth"].documentation == (
        "Rows waiting for a batch worker (requests when batching is off)"
    )
    assert families["edgekit_requests"].documentation == "Inference requests received"
    assert families["edgekit_batch_size"].documentation == "Rows per executed batch (before padding)"
