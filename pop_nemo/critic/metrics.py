"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges, histograms.

Small on purpose (prometheus_client is not a dependency). Thread-safe: the engine thread and
the event loop both record.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.label_names:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read at scrape time from ``fn`` (queue depth, readiness), or set explicitly."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None):
        super().__init__(name, help)
        self._fn = fn
        self._value = 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def value(self) -> float:
        if self._fn is not None:
            return float(self._fn())
        with self._lock:
            return self._value

    def samples(self) -> list[str]:
        return [f"{self.name} {_fmt(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self.buckets = sorted(float(b) for b in buckets)
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), []))

    def samples(self) -> list[str]:
        out: list[str] = []
        with self._lock:
            keys = sorted(self._counts)
            snapshot = {k: (list(self._counts[k]), self._sums[k]) for k in keys}
        for key in keys:
            counts, total = snapshot[key]
            running = 0
            for b, c in zip(self.buckets + [math.inf], counts):
                running += c
                le = 'le="' + _fmt(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_fmt(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return out


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines += m.header() + m.samples()
        return "\n".join(lines) + "\n"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class CriticMetrics:
    """Everything ``GET /metrics`` reports."""

    def __init__(self, queue_depth: Callable[[], float], ready: Callable[[], float], busy: Callable[[], float]):
        r = self.registry = Registry()
        self.requests = r.add(
            Counter("pop_critic_requests_total", "HTTP requests by endpoint and status code.", ("endpoint", "code"))
        )
        self.request_latency = r.add(
            Histogram("pop_critic_request_latency_seconds", "HTTP request latency.", LATENCY_BUCKETS, ("endpoint",))
        )
        self.items = r.add(
            Counter(
                "pop_critic_items_total",
                "Items answered, by kind (judge, rubric) and outcome (valid, parse_failure, timeout, error).",
                ("kind", "outcome"),
            )
        )
        self.parse_failures = r.add(
            Counter("pop_critic_parse_failures_total", "Model outputs that did not parse or validate.", ("kind",))
        )
        self.timeouts = r.add(Counter("pop_critic_timeouts_total", "Items that missed their deadline.", ("kind",)))
        self.rejected = r.add(Counter("pop_critic_rejected_total", "Requests refused before queueing.", ("reason",)))
        self.engine_errors = r.add(Counter("pop_critic_engine_errors_total", "Engine calls that raised.", ("kind",)))
        self.batch_size = r.add(Histogram("pop_critic_batch_size", "Items per engine call.", BATCH_BUCKETS, ("kind",)))
        self.engine_latency = r.add(
            Histogram("pop_critic_engine_seconds", "Wall time of one engine call.", LATENCY_BUCKETS, ("kind",))
        )
        self.queue_wait = r.add(
            Histogram(
                "pop_critic_queue_wait_seconds",
                "Time an item waited before its engine call.",
                LATENCY_BUCKETS,
                ("kind",),
            )
        )
        self.queue_depth = r.add(Gauge("pop_critic_queue_depth", "Items waiting for the engine.", queue_depth))
        self.ready = r.add(Gauge("pop_critic_ready", "1 when the model is loaded and requests are served.", ready))
        self.busy = r.add(Gauge("pop_critic_engine_busy", "1 while the engine runs a batch.", busy))

    def render(self) -> str:
        return self.registry.render()
