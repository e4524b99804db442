"""``weighted_lru``: lowest keep score first, a blend of recency, hits and size.

llm-d's weights 0.2 / 0.5 / 0.3 are the defaults. O(n) per eviction call, amortized
over a batch by ``evict_bytes``.
"""

from __future__ import annotations

import heapq
import math
from typing import ClassVar

from kvtier.core.keys import BlockKey
from kvtier.core.policy.base import CanEvict, TrackingPolicy, Victims, check_nbytes
from kvtier.errors import ConfigError

__all__ = ["WeightedLRUPolicy"]


class _WeightedEntry:
    __slots__ = ("freq_keep", "last_access", "nbytes", "num_hits", "seq")

    def __init__(self, nbytes: int, last_access: float, seq: int) -> None:
        self.nbytes = nbytes
        self.num_hits = 0
        self.freq_keep = 0.0  # frequency_weight * f(num_hits), kept current on hits
        self.last_access = last_access
        self.seq = seq


class WeightedLRUPolicy(TrackingPolicy[_WeightedEntry]):
    """Lowest keep score first: a blend of recency, frequency and size.

    Each component is normalized to [0, 1] over the keys tracked when the victims are
    chosen::

        keep(k) = recency_weight   * r(k)
                + frequency_weight * f(k)
                + size_weight      * (1 - s(k))

        r(k) = (last_access(k) - oldest) / (newest - oldest)   (1 when all are equal)
        f(k) = log2(1 + min(hits(k), hit_cap)) / log2(1 + hit_cap)
        s(k) = nbytes(k) / max_nbytes                          (0 when all are empty)

    ``last_access`` is the ``now`` of the key's latest insert or touch, ``oldest`` and
    ``newest`` the least and greatest of those; ``hits`` counts touches and re-inserts
    since the first insert. Frequency is log-scaled so that the first few hits matter
    most (1 hit: 0.25, 3: 0.5, 7: 0.75, 15: 1 with ``hit_cap=15``). A bigger block
    frees more bytes per eviction, so size lowers the keep score. Ties go to the older
    last access, then to the earlier first insert.

    Args:
        recency_weight: Weight of ``r`` (llm-d's access_time weight).
        frequency_weight: Weight of ``f`` (llm-d's access_frequency weight).
        size_weight: Weight of ``1 - s`` (llm-d's cache_size weight).
        hit_cap: Hits beyond which a key counts as no more frequent.

    Raises:
        ConfigError: A weight is negative or not finite, all are zero, or ``hit_cap``
            is less than 1.
    """

    __slots__ = ("_freq_keep", "_next_seq", "_weights")
    name: ClassVar[str] = "weighted_lru"

    def __init__(
        self,
        recency_weight: float = 0.2,
        frequency_weight: float = 0.5,
        size_weight: float = 0.3,
        hit_cap: int = 15,
    ) -> None:
        _check_config(recency_weight, frequency_weight, size_weight, hit_cap)
        self._weights = (
            float(recency_weight),
            float(frequency_weight),
            float(size_weight),
        )
        # frequency_weight * f(hits) for hits 0..hit_cap, so a hit costs no log2.
        self._freq_keep = tuple(
            frequency_weight * math.log2(1 + num_hits) / math.log2(1 + hit_cap)
            for num_hits in range(hit_cap + 1)
        )
        self._next_seq = 0
        super().__init__({})

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        check_nbytes(nbytes)
        entry = self._entries.get(key)
        if entry is not None:
            self._total_bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes
            self._hit(entry, now)
            return
        self._entries[key] = _WeightedEntry(nbytes, now, self._next_seq)
        self._next_seq += 1
        self._total_bytes += nbytes

    def touch(self, key: BlockKey, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._hit(entry, now)

    def _hit(self, entry: _WeightedEntry, now: float) -> None:
        entry.num_hits += 1
        entry.freq_keep = self._freq_keep[min(entry.num_hits, len(self._freq_keep) - 1)]
        # max(): a caller's clock stepping back must not make a hit look older.
        entry.last_access = max(entry.last_access, now)

    def remove(self, key: BlockKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._total_bytes -= entry.nbytes

    def keep_score(self, key: BlockKey) -> float:
        """The keep score of ``key`` against the keys tracked now (see the class).

        O(n): for tests and diagnostics, not for a hot path.
        """
        oldest, recency_scale, size_scale, constant = self._score_terms()
        e = self._entries[key]
        return (
            recency_scale * (e.last_access - oldest)
            + e.freq_keep
            - size_scale * e.nbytes
            + constant
        )

    def _score_terms(self) -> tuple[float, float, float, float]:
        """The class's formula with its normalizations folded into four numbers.

        Returns:
            ``(oldest, recency_scale, size_scale, constant)`` such that ``keep(e) ==
            recency_scale * (e.last_access - oldest) + e.freq_keep
            - size_scale * e.nbytes + constant``.
        """
        w_recency, _, w_size = self._weights
        last_accesses = [e.last_access for e in self._entries.values()]
        oldest = min(last_accesses, default=0.0)
        span = max(last_accesses, default=0.0) - oldest
        max_nbytes = max((e.nbytes for e in self._entries.values()), default=0)
        recency_scale = w_recency / span if span > 0 else 0.0
        size_scale = w_size / max_nbytes if max_nbytes > 0 else 0.0
        constant = w_size + (0.0 if span > 0 else w_recency)
        return oldest, recency_scale, size_scale, constant

    def _victims(self, can_evict: CanEvict | None) -> Victims:
        heap = self._ranking()
        while heap:
            key = heapq.heappop(heap)[3]
            if can_evict is not None and not can_evict(key):
                continue  # nothing was moved, so nothing to put back
            entry = self._entries.pop(key)
            self._total_bytes -= entry.nbytes
            yield key, entry.nbytes

    def _ranking(self) -> list[tuple[float, float, int, BlockKey]]:
        # The normalizations depend on the min/max over all keys, so no order can be
        # kept incrementally: each call ranks every key (O(n), the constant left out
        # since it moves no key past another) and heapifies, and a batch pops its
        # victims off that one heap (O(log n) each). Within a batch the normalization
        # stays the one at its start; evicting one evict() at a time can differ
        # slightly because each call renormalizes.
        oldest, recency_scale, size_scale, _ = self._score_terms()
        heap = [
            (
                recency_scale * (e.last_access - oldest)
                + e.freq_keep
                - size_scale * e.nbytes,
                e.last_access,
                e.seq,
                key,
            )
            for key, e in self._entries.items()
        ]
        heapq.heapify(heap)
        return heap


def _check_config(
    recency_weight: float, frequency_weight: float, size_weight: float, hit_cap: int
) -> None:
    weights = {
        "recency_weight": recency_weight,
        "frequency_weight": frequency_weight,
        "size_weight": size_weight,
    }
    for field_name, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(
                f"{field_name} must be a finite number >= 0, got {weight!r}"
            )
    if recency_weight + frequency_weight + size_weight <= 0:
        raise ConfigError("recency_weight, frequency_weight, size_weight are all 0")
    if hit_cap < 1:
        raise ConfigError(f"hit_cap must be an integer >= 1, got {hit_cap!r}")
