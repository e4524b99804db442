"""The router's Prometheus metrics, in a registry of its own.

Ingestion counts in plain ints on each pod (an increment per event in the hot path
costs far less than a labelled prometheus counter); a collector turns them into
metric families when ``/metrics`` is scraped. Only the route timings are observed
live, in histograms. Names follow seed 004 where one fits: the global index size,
lookup latency and hit ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.router.router import Pod, Router

__all__ = ["RouterMetrics"]

_RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class RouterMetrics:
    """Route histograms plus the router's counters and gauges, at scrape time."""

    def __init__(self, router: Router) -> None:
        self.registry = CollectorRegistry()
        self.route_seconds = Histogram(
            "kvtier_router_cache_lookup_latency_seconds",
            "Time to answer a route request (keys, store match, scoring).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.hit_ratio = Histogram(
            "kvtier_router_cache_hit_ratio",
            "Cached fraction of each routed prompt on the pod ranked first.",
            buckets=_RATIO_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(router))

    def observe(self, seconds: float, hit_ratio: float) -> None:
        self.route_seconds.observe(seconds)
        self.hit_ratio.observe(hit_ratio)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        router = self._router
        yield _gauge(
            "kvtier_router_global_index_size",
            "Distinct kvtier blocks held by some pod.",
            [((), router.index.num_keys)],
        )
        yield _counter(
            "kvtier_router_store_errors",
            "Route requests whose shared-store match failed or timed out.",
            [((), router.store_errors)],
        )
        yield from _pod_families(router)


# Per-pod numbers: (name, help, kind, value of a pod).
_PER_POD: tuple[tuple[str, str, str, Callable[[Pod], float]], ...] = (
    (
        "kvtier_router_pod_engine_blocks",
        "Engine blocks indexed per pod.",
        "gauge",
        lambda p: p.chains.num_blocks,
    ),
    (
        "kvtier_router_pod_blocks",
        "kvtier blocks whose last engine block the pod holds.",
        "gauge",
        lambda p: p.chains.num_keys,
    ),
    (
        "kvtier_router_pod_load",
        "The load each pod last reported.",
        "gauge",
        lambda p: p.load,
    ),
    (
        "kvtier_router_event_batches",
        "Event batches applied per pod.",
        "counter",
        lambda p: p.counters.batches,
    ),
)


def _pod_families(router: Router) -> Iterator[Metric]:
    pods = list(router.pods.values())
    yield _gauge(
        "kvtier_router_pods",
        "Pods followed, by state.",
        [((state,), sum(p.state == state for p in pods)) for state in _STATES],
        ["state"],
    )
    for name, text, kind, value in _PER_POD:
        family = _gauge if kind == "gauge" else _counter
        yield family(name, text, [((p.pod_id,), value(p)) for p in pods], ["pod"])
    yield from _tables(pods)


_STATES = ("waiting", "live", "replaying", "silent")


def _tables(pods: list[Pod]) -> Iterator[Metric]:
    tables = (
        ("kvtier_router_events", "Events per pod and type.", "events", "type"),
        (
            "kvtier_router_stream_anomalies",
            "Batches that were not the next one: gap, restart, first, duplicate.",
            "verdicts",
            "kind",
        ),
        ("kvtier_router_resyncs", "Index drops per pod and cause.", "resyncs", "cause"),
        ("kvtier_router_replays", "Replays per pod and outcome.", "replays", "outcome"),
    )
    for name, text, attr, label in tables:
        samples = [
            ((p.pod_id, key), value)
            for p in pods
            for key, value in getattr(p.counters, attr).items()
        ]
        yield _counter(name, text, samples, ["pod", label])
    yield _counter(
        "kvtier_router_engine_blocks",
        "Engine blocks per pod and operation (stored, removed, evicted).",
        [
            ((p.pod_id, op), getattr(p.chains.stats, op))
            for p in pods
            for op in ("stored", "removed", "evicted")
        ],
        ["pod", "op"],
    )
    yield _counter(
        "kvtier_router_ignored_blocks",
        "Engine blocks not indexed, per pod and reason.",
        [
            ((p.pod_id, reason), n)
            for p in pods
            for reason, n in p.chains.stats.ignored.items()
        ],
        ["pod", "reason"],
    )


Sample = tuple[tuple[str, ...], float]
Samples = Sequence[Sample]


def _gauge(
    name: str, text: str, samples: Samples, labels: list[str] | None = None
) -> Metric:
    family = GaugeMetricFamily(name, text, labels=labels or [])
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _counter(
    name: str, text: str, samples: Samples, labels: list[str] | None = None
) -> Metric:
    family = CounterMetricFamily(name, text, labels=labels or [])
    for values, value in samples:
        family.add_metric(list(values), value)
    return family
