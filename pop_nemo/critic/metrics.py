"""What the critic server's ``GET /metrics`` reports, through ``prometheus_client``.

Each service has its own registry, so two servers in one process (tests, a colocated judge)
never share a counter. The names are part of the interface: dashboards, ``bench/critic_load.py``
and the tests read them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pop_nemo.serving import BATCH_BUCKETS, LATENCY_BUCKETS, RequestMetrics


class CriticMetrics:
    """Everything ``GET /metrics`` reports; gauges are read at scrape time."""

    def __init__(self, queue_depth: Callable[[], float], ready: Callable[[], float], busy: Callable[[], float]):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http = RequestMetrics("pop_critic", r)
        self.items = Counter(
            "pop_critic_items",
            "Items answered, by kind (judge, rubric) and outcome (valid, parse_failure, timeout, error).",
            ("kind", "outcome"),
            registry=r,
        )
        self.parse_failures = Counter(
            "pop_critic_parse_failures", "Model outputs that did not parse or validate.", ("kind",), registry=r
        )
        self.timeouts = Counter("pop_critic_timeouts", "Items that missed their deadline.", ("kind",), registry=r)
        self.rejected = Counter("pop_critic_rejected", "Requests refused before queueing.", ("reason",), registry=r)
        self.engine_errors = Counter("pop_critic_engine_errors", "Engine calls that raised.", ("kind",), registry=r)
        self.batch_size = Histogram(
            "pop_critic_batch_size", "Items per engine call.", ("kind",), buckets=BATCH_BUCKETS, registry=r
        )
        self.engine_latency = Histogram(
            "pop_critic_engine_seconds", "Wall time of one engine call.", ("kind",), buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "pop_critic_queue_wait_seconds",
            "Time an item waited before its engine call.",
            ("kind",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for name, doc, fn in (
            ("pop_critic_queue_depth", "Items waiting for the engine.", queue_depth),
            ("pop_critic_ready", "1 when the model is loaded and requests are served.", ready),
            ("pop_critic_engine_busy", "1 while the engine runs a batch.", busy),
        ):
            Gauge(name, doc, registry=r).set_function(fn)
