"""Prometheus metrics for `tandem serve` (GET /metrics), one registry per server. Torch-free.

    tandem_requests_total{endpoint, model, version, code}      every request answered
    tandem_request_failures_total{endpoint, model, version, code}  those answered with 4xx/5xx
    tandem_request_seconds{endpoint, model, version}           time from request to response
    tandem_queue_seconds{model, version}                       waiting for a batch
    tandem_compute_seconds{model, version}                     the batch's run, per request
    tandem_batch_size{model, version}                          images per run of the model
    tandem_store_seconds{model, version}                       waiting for the prediction log's commit
    tandem_explain_seconds{model, version, part}               an explanation's work: occlusion, rules
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for app.py)

_LATENCY = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_requests", "Requests answered", ["endpoint", "model", "version", "code"], registry=r)
        self.failures = Counter("tandem_request_failures", "Requests answered with an error",
                                ["endpoint", "model", "version", "code"], registry=r)
        self.latency = Histogram("tandem_request_seconds", "Request latency, arrival to response",
                                 ["endpoint", "model", "version"], buckets=_LATENCY, registry=r)
        self.queue = Histogram("tandem_queue_seconds", "Time a request waited for its batch",
                               ["model", "version"], buckets=_LATENCY, registry=r)
        self.compute = Histogram("tandem_compute_seconds", "Run time of the batch a request was in",
                                 ["model", "version"], buckets=_LATENCY, registry=r)
        self.store = Histogram("tandem_store_seconds", "Time waiting for the prediction log's commit",
                               ["model", "version"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("tandem_batch_size", "Images per run of the model", ["model", "version"],
                                    buckets=_BATCH, registry=r)
        self.explain = Histogram("tandem_explain_seconds", "Time an explanation's parts took (occlusion, rules)",
                                 ["model", "version", "part"], buckets=_LATENCY, registry=r)
        self.loaded = Gauge("tandem_model_loaded", "1 while a model version is loaded", ["model", "version"], registry=r)
        self._children: dict = {}

    def child(self, metric, *labels: str):
        """labels() looks children up under a lock; the hot path keeps its own map."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_request(self, endpoint: str, model: str, version: str, code: int, seconds: float) -> None:
        self.child(self.requests, endpoint, model, version, str(code)).inc()
        if code >= 400:
            self.child(self.failures, endpoint, model, version, str(code)).inc()
        self.child(self.latency, endpoint, model, version).observe(seconds)

    def observe_batch(self, model: str, version: int, size: int, seconds: float) -> None:
        self.child(self.batch_size, model, str(version)).observe(size)

    def observe_run(self, model: str, version: int, queue_s: float, compute_s: float) -> None:
        self.child(self.queue, model, str(version)).observe(queue_s)
        self.child(self.compute, model, str(version)).observe(compute_s)

    def observe_explain(self, model: str, version: int, part: str, seconds: float) -> None:
        self.child(self.explain, model, str(version), part).observe(seconds)

    def set_loaded(self, loaded: dict) -> None:
        """tandem_model_loaded from the repository's table {model: {version: ...}}, after each load or unload."""
        self.loaded.clear()
        for model, versions in loaded.items():
            for version in versions:
                self.loaded.labels(model, str(version)).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
