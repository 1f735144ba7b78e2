"""Prometheus metrics of the runtime, labelled by model and version (one registry per Runtime)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from threading import Lock

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edgekit_runtime.delay import CLOSE_REASONS
from edgekit_runtime.livestats import Predictions, Window

__all__ = ["CONTENT_TYPE", "Figures", "Metrics", "ModelMetrics", "merge_expositions"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# *_created series double the scrape size for nothing a device dashboard uses.
disable_created_metrics()

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: (model, version, queued rows) of every loaded version, read at scrape time
QueueSource = Callable[[], Iterable[tuple[str, str, int]]]


@dataclass(frozen=True)
class ModelMetrics:
    """Label children resolved once per model version, so the request path only increments."""

    requests: Counter
    errors_by_code: Callable[[int], Counter]
    latency: Histogram
    batch_rows: Histogram
    padding_rows: Counter
    window: Window | None = None  # the telemetry interval's figures (livestats.py)
    closed: Mapping[str, Counter] = field(default_factory=dict)  # batches by close reason

    def on_close(self, reason: str) -> None:
        counter = self.closed.get(reason)
        if counter is not None:
            counter.inc()

    def on_batch(self, rows: int, padded: int) -> None:
        self.batch_rows.observe(rows)
        if self.window is not None:
            self.window.batch(rows)
        if padded > rows:
            self.padding_rows.inc(padded - rows)


@dataclass(frozen=True)
class Figures:
    """A model version's totals so far: requests, server errors (5xx) and the latency histogram's
    cumulative buckets, so two readings give what happened between them (the health window)."""

    requests: float
    server_errors: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound in seconds, cumulative count)

    def since(self, earlier: Figures) -> Figures:
        before = dict(earlier.buckets)
        return Figures(
            self.requests - earlier.requests,
            self.server_errors - earlier.server_errors,
            tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
        )

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (None without requests)."""
        total = self.buckets[-1][1] if self.buckets else 0.0
        if total <= 0:
            return None
        for le, n in self.buckets:
            if n >= q * total:
                return le
        return None


class _QueueCollector(Collector):
    def __init__(self) -> None:
        self.source: QueueSource | None = None
        self.connections: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "edgekit_queue_depth",
            "Rows waiting for a batch worker (requests when batching is off)",
            labels=["model", "version"],
        )
        if self.source is not None:
            for model, version, rows in self.source():
                depth.add_metric([model, version], rows)
        yield depth
        if self.connections is not None:
            ready, waiting = self.connections()
            conns = GaugeMetricFamily(
                "edgekit_http_connections",
                "Open connections of the native HTTP server: waiting (a request in flight, nothing more "
                "comes before its answer) or ready (could send a request now; pipelining ones count here)",
                labels=["state"],
            )
            conns.add_metric(["ready"], ready)
            conns.add_metric(["waiting"], waiting)
            yield conns

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    """The runtime's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.requests = Counter("edgekit_requests", "Inference requests received", labels, registry=self.registry)
        self.errors = Counter(
            "edgekit_request_errors",
            "Inference requests that failed, by HTTP status",
            [*labels, "code"],
            registry=self.registry,
        )
        self.http_errors = Counter(
            "edgekit_http_errors",
            "Error replies of any route, by HTTP status and kind (the error's class; a 500's is the bug's)",
            ["code", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgekit_request_latency_seconds",
            "Inference latency inside the server (decoded request to outputs)",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "edgekit_batch_size",
            "Rows per executed batch (before padding)",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.padding = Counter(
            "edgekit_batch_padding_rows",
            "Dummy rows added to reach an allowed batch size",
            labels,
            registry=self.registry,
        )
        self.batches = Counter(
            "edgekit_batches",
            "Executed batches by why they closed: full (max_batch_size rows), timeout (the oldest request "
            "waited batch_timeout_micros), early (the adaptive policy ran it sooner)",
            [*labels, "reason"],
            registry=self.registry,
        )
        self._queue = _QueueCollector()
        self.registry.register(self._queue)
        self._windows: dict[tuple[str, int], Window] = {}
        self._windows_lock = Lock()
        self.predictions = Predictions()  # answers to requests with an id, for ground-truth feedback

    def set_queue_source(self, source: QueueSource) -> None:
        self._queue.source = source

    def set_connection_source(self, source: Callable[[], tuple[int, int]] | None) -> None:
        """(ready, waiting) connections of the HTTP server, for ``edgekit_http_connections``."""
        self._queue.connections = source

    def for_model(self, name: str, version: int) -> ModelMetrics:
        v = str(version)

        def errors_by_code(code: int) -> Counter:
            return self.errors.labels(name, v, str(code))

        with self._windows_lock:
            window = self._windows.setdefault((name, version), Window(name, version))
        return ModelMetrics(
            requests=self.requests.labels(name, v),
            errors_by_code=errors_by_code,
            latency=self.latency.labels(name, v),
            batch_rows=self.batch_rows.labels(name, v),
            padding_rows=self.padding.labels(name, v),
            window=window,
            closed={reason: self.batches.labels(name, v, reason) for reason in CLOSE_REASONS},
        )

    def windows(self) -> list[Window]:
        """Every model version's telemetry window (livestats.Window), in (model, version) order."""
        with self._windows_lock:
            return [self._windows[k] for k in sorted(self._windows)]

    def window(self, name: str, version: int) -> Window | None:
        with self._windows_lock:
            return self._windows.get((name, version))

    def drop_window(self, name: str, version: int) -> None:
        """Forget a version's window (it left the runtime and its last interval was sent)."""
        with self._windows_lock:
            self._windows.pop((name, version), None)

    def figures(self, name: str, version: int) -> Figures:
        """The totals of one model version (all zero when it never served)."""
        labels = {"model": name, "version": str(version)}
        get = self.registry.get_sample_value
        errors = 0.0
        for metric in self.errors.collect():
            for sample in metric.samples:
                code = sample.labels.get("code", "")
                same = sample.labels.get("model") == name and sample.labels.get("version") == labels["version"]
                if sample.name.endswith("_total") and same and code.isdigit() and int(code) >= 500:
                    errors += sample.value
        buckets = tuple(
            (le, get("edgekit_request_latency_seconds_bucket", {**labels, "le": floatToGoString(le)}) or 0.0)
            for le in (*_LATENCY_BUCKETS, float("inf"))
        )
        return Figures(get("edgekit_requests_total", labels) or 0.0, errors, buckets)

    def http_error(self, code: int, kind: str) -> None:
        self.http_errors.labels(str(code), kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Several processes' expositions (``--workers``) as one: each sample summed over the processes
    by name and labels. Counters, and a histogram's buckets, sum and count, add up exactly (the
    buckets are the same everywhere); the gauges, ``edgekit_queue_depth`` and
    ``edgekit_http_connections``, become the rows waiting and the connections open in all processes
    together."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
            sums = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                sums[key] = sums.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), total in values[name].items():
            family.add_sample(sample_name, dict(labels), total)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
