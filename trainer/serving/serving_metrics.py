"""The prediction server's Prometheus metrics: requests, errors, latency, batch sizes."""

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import PlatformCollector
from prometheus_client import ProcessCollector
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Request latency from a few milliseconds (a 32x32 image on a small network) to seconds (a large photo on resnet50).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class ServingMetrics:
    """One registry per server, so that several servers in one process (tests) keep separate counts."""

    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter("serving_requests", "HTTP requests answered, by route and status code.",
                                ["route", "code"], registry=self.registry)
        self.errors = Counter("serving_errors", "Requests answered with an error status (4xx, 5xx), by route and "
                              "status code.", ["route", "code"], registry=self.registry)
        self.latency = Histogram("serving_request_latency_seconds", "Time from a request's arrival to its answer, "
                                 "by route.", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.instances = Counter("serving_instances", "Images classified.", registry=self.registry)
        self.batch_size = Histogram("serving_batch_size", "Images per model call (with dynamic batching, the "
                                    "requests merged into one call).", buckets=BATCH_BUCKETS, registry=self.registry)
        self.model_latency = Histogram("serving_model_latency_seconds", "Time of one model call.",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ready = Gauge("serving_model_ready", "1 once the model is loaded and the server answers predictions.",
                           registry=self.registry)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)
        if code >= 400:
            self.errors.labels(route, str(code)).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.instances.inc(size)
        self.batch_size.observe(size)
        self.model_latency.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
