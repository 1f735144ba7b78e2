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
from edgekit_runtime.metrics import CONTENT_TYPE, Figures, Metrics
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
    # the bundle's timeout is 0: the batches of 3 and 1 rows closed on it, the 8 rows were full
    assert value(text, "edgekit_batches_total", reason="timeout", **MLP) == 2
    assert value(text, "edgekit_batches_total", reason="full", **MLP) == 1
    assert value(text, "edgekit_batches_total", reason="early", **MLP) == 0


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
    mm.on_close("early")
    mm.on_close("early")
    mm.on_close("full")
    mm.on_close("no such reason")  # not a series of its own
    assert {
        r: value(text2 := m.render().decode(), "edgekit_batches_total", reason=r, **labels)
        for r in ("full", "timeout", "early")
    } == {"full": 1, "timeout": 0, "early": 2}
    assert "no such reason" not in text2
    assert "_created" not in text  # disabled: they double the scrape for nothing


def test_the_metrics_describe_themselves() -> None:
    families = {f.name: f for f in text_string_to_metric_families(Metrics().render().decode())}
    assert families["edgekit_requests"].type == "counter"
    assert families["edgekit_request_latency_seconds"].type == "histogram"
    assert families["edgekit_batch_size"].type == "histogram"
    assert families["edgekit_batch_padding_rows"].type == "counter"
    assert families["edgekit_queue_depth"].type == "gauge"
    assert families["edgekit_batches"].type == "counter"
    assert "full (max_batch_size rows), timeout" in families["edgekit_batches"].documentation
    assert families["edgekit_queue_depth"].documentation == (
        "Rows waiting for a batch worker (requests when batching is off)"
    )
    assert families["edgekit_requests"].documentation == "Inference requests received"
    assert families["edgekit_batch_size"].documentation == "Rows per executed batch (before padding)"


INF = float("inf")
# the latency histogram's upper bounds, as Metrics.figures reads them (seconds, then +Inf)
LES = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, INF)


def test_figures_are_one_versions_totals_with_only_its_server_errors() -> None:
    m = Metrics()
    mm = m.for_model("m", 3)
    for _ in range(4):
        mm.requests.inc()
    mm.errors_by_code(500).inc(2)
    mm.errors_by_code(503).inc()
    mm.errors_by_code(400).inc(5)  # a client error: not the server's
    mm.errors_by_code(499).inc()
    m.errors.labels("m", "3", "abc").inc()  # not a status: ignored
    for seconds in (0.0007, 0.003, 0.003, 20.0):
        mm.latency.observe(seconds)
    # the same name at another version, and another name at the same version, count for neither
    for other in (m.for_model("m", 4), m.for_model("n", 3), m.for_model("m", 33)):
        other.requests.inc(7)
        other.errors_by_code(500).inc(7)
        other.latency.observe(0.0001)
    cumulative = (0, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4)
    assert m.figures("m", 3) == Figures(4.0, 3.0, tuple(zip(LES, map(float, cumulative), strict=True)))
    assert m.figures("m", 4) == Figures(7.0, 7.0, tuple((le, 1.0) for le in LES))


def test_the_figures_of_a_version_that_never_served_are_all_zero() -> None:
    m = Metrics()
    assert m.figures("m", 1) == Figures(0.0, 0.0, tuple((le, 0.0) for le in LES))
    m.for_model("m", 1)  # its label children exist, at 0
    assert m.figures("m", 1) == Figures(0.0, 0.0, tuple((le, 0.0) for le in LES))
    assert m.figures("m", 1).quantile(0.95) is None
    assert m.figures("m", 1).error_rate == 0.0


def test_figures_count_the_requests_a_runtime_served(served: tuple[Runtime, Client]) -> None:
    rt, client = served
    for n in (3, 1):
        assert client.post("/v1/models/mlp:predict", json={"instances": X[:n].tolist()}).status_code == 200
    assert client.post("/v1/models/mlp:predict", json={"instances": [[1, 2]]}).status_code == 400
    f = rt.metrics.figures("mlp", 1)
    assert (f.requests, f.server_errors) == (3.0, 0.0)
    assert [le for le, _ in f.buckets] == list(LES)
    assert f.buckets[-1] == (INF, 3.0)  # the 400 (a wrong shape, refused by the model) is timed too


def test_figures_since_an_earlier_reading_are_what_happened_between() -> None:
    earlier = Figures(2.0, 1.0, ((0.001, 1.0), (0.01, 2.0), (INF, 2.0)))
    later = Figures(5.0, 3.0, ((0.001, 1.0), (0.01, 4.0), (INF, 5.0)))
    assert later.since(earlier) == Figures(3.0, 2.0, ((0.001, 0.0), (0.01, 2.0), (INF, 3.0)))
    # the agent's reading before a version ever served has no buckets: everything is new
    assert later.since(Figures(0.0, 0.0, ())) == later
    # a bucket the earlier reading lacks counts from 0
    assert later.since(Figures(1.0, 0.0, ((0.01, 1.0),))) == Figures(4.0, 3.0, ((0.001, 1.0), (0.01, 3.0), (INF, 5.0)))


def test_the_error_rate_is_server_errors_over_requests() -> None:
    assert Figures(8.0, 2.0, ()).error_rate == 0.25
    assert Figures(0.0, 0.0, ()).error_rate == 0.0


def test_a_quantile_is_the_upper_bound_of_the_bucket_holding_it() -> None:
    f = Figures(5.0, 0.0, ((0.001, 1.0), (0.01, 3.0), (0.1, 4.0), (INF, 5.0)))
    assert f.quantile(0.2) == 0.001  # exactly the 1st of 5
    assert f.quantile(0.5) == 0.01
    assert f.quantile(0.8) == 0.1
    assert f.quantile(0.95) == INF
    assert f.quantile(1.0) == INF
    assert Figures(4.0, 0.0, ((0.001, 1.0), (0.01, 3.0), (INF, 4.0))).quantile(0.25) == 0.001
    # one request is enough
    assert Figures(1.0, 0.0, ((0.001, 0.0), (0.01, 1.0), (INF, 1.0))).quantile(0.5) == 0.01
    # without requests there is none
    assert Figures(0.0, 0.0, ((0.001, 0.0), (INF, 0.0))).quantile(0.5) is None
    assert Figures(0.0, 0.0, ()).quantile(0.5) is None


def test_http_errors_are_counted_by_code_and_kind() -> None:
    m = Metrics()
    m.http_error(404, "NotFoundError")
    m.http_error(404, "NotFoundError")
    m.http_error(500, "KeyError")
    text = m.render().decode()
    assert value(text, "edgekit_http_errors_total", code="404", kind="NotFoundError") == 2
    assert value(text, "edgekit_http_errors_total", code="500", kind="KeyError") == 1


def test_every_metric_has_its_help_text() -> None:
    m = Metrics()
    m.for_model("m", 1).errors_by_code(500).inc()
    m.http_error(500, "KeyError")
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert {name: f.documentation for name, f in families.items()} == {
        "edgekit_requests": "Inference requests received",
        "edgekit_request_errors": "Inference requests that failed, by HTTP status",
        "edgekit_http_errors": (
            "Error replies of any route, by HTTP status and kind (the error's class; a 500's is the bug's)"
        ),
        "edgekit_request_latency_seconds": "Inference latency inside the server (decoded request to outputs)",
        "edgekit_batch_size": "Rows per executed batch (before padding)",
        "edgekit_batch_padding_rows": "Dummy rows added to reach an allowed batch size",
        "edgekit_queue_depth": "Rows waiting for a batch worker (requests when batching is off)",
        "edgekit_batches": (
            "Executed batches by why they closed: full (max_batch_size rows), timeout (the oldest request "
            "waited batch_timeout_micros), early (the adaptive policy ran it sooner)"
        ),
    }
    assert value(m.render().decode(), "edgekit_request_errors_total", model="m", version="1", code="500") == 1
