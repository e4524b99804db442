"""Prometheus metrics of a node: every metric of seed 004, per tier and quota group.

Request metrics (latency histograms, bytes moved) are recorded as requests finish; the
cache's own figures (hit ratio, usage, items, evictions) are read from
``TieredStore.stats()`` at scrape time by a custom collector, so they are never stale
and cost nothing between scrapes.

| seed 004 name              | kvtier metric                                           |
| -------------------------- | ------------------------------------------------------- |
| cache_hit_ratio            | ``kvtier_cache_hit_ratio``                              |
| cache_miss_ratio           | ``kvtier_cache_miss_ratio``                             |
| cache_eviction_rate        | ``kvtier_cache_eviction_rate`` (per s, last minute),    |
|                            | ``kvtier_cache_evictions_total{tier}``                  |
| cache_utilization          | ``kvtier_cache_utilization{tier}``                      |
| cache_lookup_latency       | ``kvtier_cache_lookup_latency_seconds{op}``             |
| cache_storage_latency      | ``kvtier_cache_storage_latency_seconds{op}``            |
| cache_transfer_bandwidth   | ``kvtier_cache_transfer_bandwidth_bytes_per_second``,   |
|                            | ``kvtier_cache_transfer_bytes_total{direction}``        |
| cache_size_bytes           | ``kvtier_cache_size_bytes{tier}``,                      |
|                            | ``kvtier_cache_group_size_bytes{tier,group}``           |
| cache_items_count          | ``kvtier_cache_items_count{tier}``,                     |
|                            | ``kvtier_cache_group_items_count{tier,group}``          |
| cache_memory_usage         | ``kvtier_cache_memory_usage_bytes``                     |
| cache_disk_usage           | ``kvtier_cache_disk_usage_bytes``                       |
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.protocol import Op
from kvtier.results import StoreStats
from kvtier.store import TieredStore

__all__ = ["NodeMetrics"]

_LOOKUPS = {Op.MATCH, Op.CONTAINS, Op.GET, Op.LEASE}
_STORES = {Op.PUT, Op.RESERVE, Op.COMMIT}
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_RATE_WINDOW_S = 60.0


class NodeMetrics:
    """The node's registry; :meth:`observe_op` records one request."""

    def __init__(
        self, store: TieredStore, cluster_size: Callable[[], int] | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kvtier_requests",
            "Requests served, by operation.",
            ["op"],
            registry=self.registry,
        )
        self.lookup_latency = Histogram(
            "kvtier_cache_lookup_latency_seconds",
            "Time to answer a lookup (match, contains, get, lease), seconds.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.storage_latency = Histogram(
            "kvtier_cache_storage_latency_seconds",
            "Time to store blocks (put, reserve, commit), seconds.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.transfer = Counter(
            "kvtier_cache_transfer_bytes",
            "Payload bytes moved, by direction.",
            ["direction"],
            registry=self.registry,
        )
        self._cache = _CacheCollector(store, cluster_size)
        self.registry.register(self._cache)
        # An operation's labelled series, looked up once: a request is a few tens of
        # microseconds, and every labels() call takes a lock and builds a tuple.
        self._series: dict[int, tuple[Counter, Histogram | None]] = {}
        self._received = self.transfer.labels("in")

    def observe_op(self, op: int, seconds: float, payload_bytes: int) -> None:
        series = self._series.get(op)
        if series is None:
            series = self._series[op] = self._op_series(op)
        requests, latency = series
        requests.inc()
        if latency is not None:
            latency.observe(seconds)
        if payload_bytes:
            self._received.inc(payload_bytes)

    def _op_series(self, op: int) -> tuple[Counter, Histogram | None]:
        name = _op_name(op)
        if op in _LOOKUPS:
            latency = self.lookup_latency.labels(name)
        elif op in _STORES:
            latency = self.storage_latency.labels(name)
        else:
            latency = None
        return self.requests.labels(name), latency

    def observe_sent(self, payload_bytes: int) -> None:
        if payload_bytes:
            self.transfer.labels("out").inc(payload_bytes)
            self._cache.note_transfer(payload_bytes)

    def observe_received(self, payload_bytes: int) -> None:
        self._cache.note_transfer(payload_bytes)


def _op_name(op: int) -> str:
    try:
        return Op(op).name.lower()
    except ValueError:
        return "unknown"


class _CacheCollector(Collector):
    """Reads the store's statistics at scrape time."""

    def __init__(
        self, store: TieredStore, cluster_size: Callable[[], int] | None
    ) -> None:
        self.store = store
        self.cluster_size = cluster_size
        self._evictions: collections.deque[tuple[float, int]] = collections.deque()
        self._transfers: collections.deque[tuple[float, int]] = collections.deque()

    def note_transfer(self, nbytes: int) -> None:
        """Adds to the current second's bucket, so memory stays bounded between
        scrapes however many requests come."""
        second = float(int(time.monotonic()))
        if self._transfers and self._transfers[-1][0] == second:
            self._transfers[-1] = (second, self._transfers[-1][1] + nbytes)
        else:
            self._transfers.append((second, nbytes))
            while self._transfers[0][0] < second - _RATE_WINDOW_S:
                self._transfers.popleft()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.store.stats()
        now = time.monotonic()
        yield _gauge(
            "kvtier_cache_hit_ratio", "Blocks found / looked up.", stats.hit_ratio
        )
        looked_up = stats.hit_blocks + stats.miss_blocks
        yield _gauge(
            "kvtier_cache_miss_ratio",
            "Blocks missed / looked up.",
            stats.miss_blocks / looked_up if looked_up else 0.0,
        )
        yield _counter("kvtier_cache_lookups", "Lookups served.", stats.lookups)
        yield _counter("kvtier_cache_hit_blocks", "Blocks found.", stats.hit_blocks)
        yield _counter("kvtier_cache_miss_blocks", "Blocks missed.", stats.miss_blocks)
        yield from self._tier_metrics(stats, now)
        yield from self._group_metrics(stats)
        if self.cluster_size is not None:
            yield _gauge(
                "kvtier_cluster_nodes",
                "Live nodes this node sees.",
                self.cluster_size(),
            )
        yield _gauge(
            "kvtier_cache_transfer_bandwidth_bytes_per_second",
            "Payload bytes moved per second over the last minute.",
            self._rate(self._transfers, now, 0),
        )

    def _tier_metrics(
        self, stats: StoreStats, now: float
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        size = GaugeMetricFamily(
            "kvtier_cache_size_bytes", "Bytes held.", labels=["tier"]
        )
        cap = GaugeMetricFamily(
            "kvtier_cache_capacity_bytes", "Capacity.", labels=["tier"]
        )
        items = GaugeMetricFamily(
            "kvtier_cache_items_count", "Blocks held.", labels=["tier"]
        )
        util = GaugeMetricFamily(
            "kvtier_cache_utilization", "Used / capacity.", labels=["tier"]
        )
        evict = CounterMetricFamily(
            "kvtier_cache_evictions", "Blocks evicted.", labels=["tier"]
        )
        hits = CounterMetricFamily(
            "kvtier_cache_tier_hits", "Blocks served by tier.", labels=["tier"]
        )
        up = GaugeMetricFamily(
            "kvtier_backend_up",
            "1 while a tier answers; a failing remote tier is skipped (0).",
            labels=["tier"],
        )
        errors = CounterMetricFamily(
            "kvtier_backend_errors", "Failed calls to a tier.", labels=["tier"]
        )
        total_evictions = 0
        for tier in stats.tiers.values():
            size.add_metric([tier.name], tier.used_bytes)
            cap.add_metric([tier.name], tier.capacity_bytes)
            items.add_metric([tier.name], tier.num_blocks)
            util.add_metric(
                [tier.name],
                tier.used_bytes / tier.capacity_bytes if tier.capacity_bytes else 0.0,
            )
            evict.add_metric([tier.name], tier.evictions)
            hits.add_metric([tier.name], tier.hits)
            up.add_metric([tier.name], 1.0 if tier.healthy else 0.0)
            errors.add_metric([tier.name], tier.errors)
            total_evictions += tier.evictions
        yield from (size, cap, items, util, evict, hits, up, errors)
        self._evictions.append((now, total_evictions))
        yield _gauge(
            "kvtier_cache_eviction_rate",
            "Blocks evicted per second over the last minute.",
            self._rate(self._evictions, now, 1),
        )
        memory, disk = stats.tiers.get("memory"), stats.tiers.get("disk")
        yield _gauge(
            "kvtier_cache_memory_usage_bytes",
            "Bytes in the memory tier.",
            memory.used_bytes if memory else 0,
        )
        yield _gauge(
            "kvtier_cache_disk_usage_bytes",
            "Bytes in the disk tier.",
            disk.used_bytes if disk else 0,
        )

    @staticmethod
    def _group_metrics(stats: StoreStats) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily(
            "kvtier_cache_group_size_bytes",
            "Bytes held per quota group (tenant).",
            labels=["tier", "group"],
        )
        items = GaugeMetricFamily(
            "kvtier_cache_group_items_count",
            "Blocks held per quota group (tenant).",
            labels=["tier", "group"],
        )
        for tier, groups in stats.group_bytes.items():
            for group, nbytes in groups.items():
                size.add_metric([tier, group], nbytes)
        for tier, groups in stats.group_blocks.items():
            for group, count in groups.items():
                items.add_metric([tier, group], count)
        yield from (size, items)

    @staticmethod
    def _rate(
        samples: collections.deque[tuple[float, int]], now: float, cumulative: int
    ) -> float:
        """Per-second rate over the window: from cumulative samples (a counter) or
        from per-event amounts."""
        while samples and samples[0][0] < now - _RATE_WINDOW_S:
            samples.popleft()
        if not samples:
            return 0.0
        if cumulative:
            first_t, first_v = samples[0]
            last_t, last_v = samples[-1]
            return (last_v - first_v) / (last_t - first_t) if last_t > first_t else 0.0
        return sum(n for _, n in samples) / _RATE_WINDOW_S


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
