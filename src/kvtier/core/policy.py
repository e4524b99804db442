"""Eviction policies: which block a full tier gives up next.

Every policy implements one interface, :class:`EvictionPolicy`. A tier tells it what it
holds (``insert``), what was read (``touch``) and what left for another reason
(``remove``); when it needs room it asks for victims (``evict`` / ``evict_bytes``),
passing a ``can_evict`` predicate that vetoes blocks a reader has leased or a writer
has not finished. A policy holds no bytes, does no I/O and reads no clock: time comes
in as ``now``. There is one interface because two callers run the same code: the
store, and the trace simulator that replays millions of requests to compare policies
offline. A policy that behaved differently in the two would make the simulator's
numbers meaningless.

The policies:

* ``lru`` (:class:`LRUPolicy`): least recently inserted or touched first. O(1).
* ``weighted_lru`` (:class:`WeightedLRUPolicy`): lowest "keep score" first, a weighted
  blend of recency, hit count and size (llm-d's weights 0.2 / 0.5 / 0.3). O(n) per
  eviction call, amortized over a batch by ``evict_bytes``.
* ``leaf_lru`` (:class:`LeafFirstLRUPolicy`): LRU among blocks no other tracked block
  names as its parent, so a prompt's prefix outlives its suffix and every stored block
  stays reachable by a prefix match. O(log n).
* ``s3fifo`` (:class:`S3FIFOPolicy`): S3-FIFO (Yang et al., SOSP'23): a small FIFO that
  filters one-hit wonders, a main FIFO with lazy reinsertion, a ghost FIFO of keys
  recently evicted from small. O(1) amortized.

None of them is thread-safe: the tier that owns one locks it. ``can_evict`` must not
call back into the policy.
"""

from __future__ import annotations

import abc
import heapq
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Generator
from typing import Any, ClassVar

from kvtier.core.keys import BlockKey
from kvtier.errors import ConfigError

__all__ = [
    "POLICIES",
    "CanEvict",
    "EvictionPolicy",
    "LRUPolicy",
    "LeafFirstLRUPolicy",
    "S3FIFOPolicy",
    "WeightedLRUPolicy",
    "make_policy",
]

CanEvict = Callable[[BlockKey], bool]
"""Whether a block may be evicted now (``False``: leased by a reader, mid-write)."""

_Victims = Generator[tuple[BlockKey, int], None, None]
"""Victims as (key, nbytes), each already removed from the policy when yielded.

Closing the generator puts back the keys it skipped, so every policy below writes its
skip-and-restore logic once and shares it between ``evict`` and ``evict_bytes``.
"""


class EvictionPolicy(abc.ABC):
    """Chooses eviction victims among the blocks one tier holds."""

    __slots__ = ()
    name: ClassVar[str]

    @abc.abstractmethod
    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        """Records that the tier now holds ``key``.

        Inserting a key already present counts as a touch and updates its size.

        Args:
            key: The block's key.
            nbytes: The block's size in bytes, as the tier stores it.
            parent: The previous block of its prompt's key chain, or ``None``.
            now: The current time in seconds.

        Raises:
            ValueError: ``nbytes`` is negative.
        """

    @abc.abstractmethod
    def touch(self, key: BlockKey, now: float) -> None:
        """Records a hit on ``key``. No-op if absent."""

    @abc.abstractmethod
    def remove(self, key: BlockKey) -> None:
        """Forgets ``key``, which left the tier for a reason other than eviction.

        No-op if absent. Not an eviction: no policy learns from it (S3-FIFO's ghost
        queue records evictions only).
        """

    @abc.abstractmethod
    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        """Chooses the next victim, forgets it and returns it.

        Args:
            now: The current time in seconds.
            can_evict: Vetoes keys that must stay (they are skipped and keep their
                place); ``None`` allows every key.

        Returns:
            The victim, or ``None`` when no tracked key may be evicted.
        """

    def evict_bytes(
        self, nbytes: int, now: float, can_evict: CanEvict | None = None
    ) -> list[BlockKey]:
        """Evicts victims, in order, until at least ``nbytes`` bytes are freed.

        Args:
            nbytes: Bytes to free; nothing is evicted when it is zero or less.
            now: The current time in seconds.
            can_evict: As for :meth:`evict`.

        Returns:
            The victims in eviction order; they free less than ``nbytes`` only when
            nothing else may be evicted.
        """
        victims: list[BlockKey] = []
        freed_bytes = 0
        while freed_bytes < nbytes:
            before_bytes = self.total_bytes
            key = self.evict(now, can_evict)
            if key is None:
                break
            victims.append(key)
            freed_bytes += before_bytes - self.total_bytes
        return victims

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of tracked keys."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked."""

    @property
    @abc.abstractmethod
    def total_bytes(self) -> int:
        """The sum of ``nbytes`` over tracked keys."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} keys, {self.total_bytes} bytes)"


def _first_victim(victims: _Victims) -> BlockKey | None:
    try:
        victim = next(victims, None)
    finally:
        victims.close()
    return None if victim is None else victim[0]


def _victims_for_bytes(victims: _Victims, nbytes: int) -> list[BlockKey]:
    keys: list[BlockKey] = []
    freed_bytes = 0
    try:
        if nbytes <= 0:
            return keys
        for key, key_bytes in victims:
            keys.append(key)
            freed_bytes += key_bytes
            if freed_bytes >= nbytes:
                break
    finally:
        victims.close()
    return keys


def _check_nbytes(nbytes: int) -> None:
    if nbytes < 0:
        raise ValueError(f"nbytes must be non-negative, got {nbytes}")


class LRUPolicy(EvictionPolicy):
    """Least recently inserted or touched first.

    An ordered dict from key to size is the whole state: its head is the victim.
    """

    __slots__ = ("_sizes", "_total_bytes")
    name: ClassVar[str] = "lru"

    def __init__(self) -> None:
        self._sizes: OrderedDict[BlockKey, int] = OrderedDict()
        self._total_bytes = 0

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        _check_nbytes(nbytes)
        self._total_bytes += nbytes - self._sizes.get(key, 0)
        self._sizes[key] = nbytes
        self._sizes.move_to_end(key)

    def touch(self, key: BlockKey, now: float) -> None:
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        self._total_bytes -= self._sizes.pop(key, 0)

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        return _first_victim(self._victims(can_evict))

    def evict_bytes(
        self, nbytes: int, now: float, can_evict: CanEvict | None = None
    ) -> list[BlockKey]:
        # One pass for the batch: the default loop would re-ask can_evict about every
        # leased key at the head once per victim.
        return _victims_for_bytes(self._victims(can_evict), nbytes)

    def _victims(self, can_evict: CanEvict | None) -> _Victims:
        sizes = self._sizes
        # Skipped keys are popped and put back at the head in their order afterwards;
        # iterating the dict in place instead would break on the pops of victims.
        skipped: list[tuple[BlockKey, int]] = []
        try:
            while sizes:
                key = next(iter(sizes))
                allowed = can_evict is None or can_evict(key)
                key_bytes = sizes.pop(key)
                if not allowed:
                    skipped.append((key, key_bytes))
                    continue
                self._total_bytes -= key_bytes
                yield key, key_bytes
        finally:
            for key, key_bytes in reversed(skipped):
                sizes[key] = key_bytes
                sizes.move_to_end(key, last=False)

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    @property
    def total_bytes(self) -> int:
        return self._total_bytes


class _WeightedEntry:
    __slots__ = ("freq_keep", "last_access", "nbytes", "num_hits", "seq")

    def __init__(self, nbytes: int, last_access: float, seq: int) -> None:
        self.nbytes = nbytes
        self.num_hits = 0
        self.freq_keep = 0.0  # frequency_weight * f(num_hits), kept current on hits
        self.last_access = last_access
        self.seq = seq


class WeightedLRUPolicy(EvictionPolicy):
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

    __slots__ = ("_entries", "_freq_keep", "_next_seq", "_total_bytes", "_weights")
    name: ClassVar[str] = "weighted_lru"

    def __init__(
        self,
        recency_weight: float = 0.2,
        frequency_weight: float = 0.5,
        size_weight: float = 0.3,
        hit_cap: int = 15,
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
        self._entries: dict[BlockKey, _WeightedEntry] = {}
        self._next_seq = 0
        self._total_bytes = 0

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        _check_nbytes(nbytes)
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

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        return _first_victim(self._victims(can_evict))

    def evict_bytes(
        self, nbytes: int, now: float, can_evict: CanEvict | None = None
    ) -> list[BlockKey]:
        return _victims_for_bytes(self._victims(can_evict), nbytes)

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

    def _victims(self, can_evict: CanEvict | None) -> _Victims:
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
        while heap:
            key = heapq.heappop(heap)[3]
            if can_evict is not None and not can_evict(key):
                continue  # nothing was moved, so nothing to put back
            entry = self._entries.pop(key)
            self._total_bytes -= entry.nbytes
            yield key, entry.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def total_bytes(self) -> int:
        return self._total_bytes


class _LeafEntry:
    __slots__ = ("nbytes", "parent", "queued", "tick")

    def __init__(self, nbytes: int, parent: BlockKey | None, tick: int) -> None:
        self.nbytes = nbytes
        self.parent = parent
        self.tick = tick
        self.queued = False  # the heap holds (tick, key) for this tick


class LeafFirstLRUPolicy(EvictionPolicy):
    """LRU among leaves: a block goes only after every tracked child of it has gone.

    A child is a key inserted with ``parent`` equal to the block's key. Evicting a
    prefix block would leave its descendants stored but unreachable, since a prefix
    match stops at the first missing block; so only leaves (tracked keys with no
    tracked children) are candidates, least recently inserted or touched first.

    Child counts are kept for every parent key, tracked or not, so a parent inserted
    after its children is a non-leaf at once. Recency is a logical tick per insert or
    touch, not ``now``, so equal times still order deterministically. Leaves wait in a
    heap of ``(tick, key)`` with lazy deletion: an entry is live while its key is
    tracked, its tick current and its key a leaf. The heap is rebuilt from the live
    entries once it holds more than three times as many entries as there are tracked
    keys (stale ones outnumber live ones two to one), which keeps each operation
    O(log n) amortized.

    A key's parent is fixed by its first insert that names one: keys are chain hashes,
    so the same key always has the same prefix. A key naming itself as its parent is
    taken to have none. Cycles of two or more keys cannot come from real key chains;
    their members are never leaves and so are never evicted.
    """

    __slots__ = ("_entries", "_heap", "_next_tick", "_num_children", "_total_bytes")
    name: ClassVar[str] = "leaf_lru"
    _HEAP_SLACK: ClassVar[int] = 64  # no rebuilds while the heap is tiny

    def __init__(self) -> None:
        self._entries: dict[BlockKey, _LeafEntry] = {}
        # parent key -> number of tracked keys naming it; absent means 0.
        self._num_children: dict[BlockKey, int] = {}
        self._heap: list[tuple[int, BlockKey]] = []
        self._next_tick = 0
        self._total_bytes = 0

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        _check_nbytes(nbytes)
        if parent == key:
            parent = None
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _LeafEntry(nbytes, None, self._next_tick)
            self._total_bytes += nbytes
        else:
            self._total_bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes
        if entry.parent is None and parent is not None:
            entry.parent = parent
            self._num_children[parent] = self._num_children.get(parent, 0) + 1
        self._access(key, entry)

    def touch(self, key: BlockKey, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._access(key, entry)

    def _access(self, key: BlockKey, entry: _LeafEntry) -> None:
        entry.tick = self._next_tick
        self._next_tick += 1
        entry.queued = False  # any heap entry of the old tick is now stale
        if key not in self._num_children:
            self._enqueue(key, entry)
        self._maybe_rebuild()

    def _enqueue(self, key: BlockKey, entry: _LeafEntry) -> None:
        heapq.heappush(self._heap, (entry.tick, key))
        entry.queued = True

    def remove(self, key: BlockKey) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._forget(key, entry)  # its heap entry, if any, turns stale
            self._maybe_rebuild()

    def _forget(self, key: BlockKey, entry: _LeafEntry) -> None:
        del self._entries[key]
        self._total_bytes -= entry.nbytes
        parent = entry.parent
        if parent is None:
            return
        num_left = self._num_children[parent] - 1
        if num_left:
            self._num_children[parent] = num_left
            return
        del self._num_children[parent]
        # The parent just became a leaf; it queues at its own last access tick.
        parent_entry = self._entries.get(parent)
        if parent_entry is not None and not parent_entry.queued:
            self._enqueue(parent, parent_entry)

    def _maybe_rebuild(self) -> None:
        # Only called outside eviction: a rebuild while _victims holds skipped keys
        # out of the heap would queue them twice.
        if len(self._heap) <= 3 * len(self._entries) + self._HEAP_SLACK:
            return
        self._heap = []
        for key, entry in self._entries.items():
            entry.queued = key not in self._num_children
            if entry.queued:
                self._heap.append((entry.tick, key))
        heapq.heapify(self._heap)

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        return _first_victim(self._victims(can_evict))

    def evict_bytes(
        self, nbytes: int, now: float, can_evict: CanEvict | None = None
    ) -> list[BlockKey]:
        return _victims_for_bytes(self._victims(can_evict), nbytes)

    def _victims(self, can_evict: CanEvict | None) -> _Victims:
        heap = self._heap
        skipped: list[tuple[int, BlockKey]] = []
        try:
            while heap:
                tick, key = heap[0]
                entry = self._entries.get(key)
                if entry is None or entry.tick != tick:
                    heapq.heappop(heap)  # stale: removed or touched since
                    continue
                if key in self._num_children:
                    heapq.heappop(heap)  # gained a child; requeued once a leaf again
                    entry.queued = False
                    continue
                if can_evict is not None and not can_evict(key):
                    skipped.append(heapq.heappop(heap))  # stays queued
                    continue
                heapq.heappop(heap)
                entry.queued = False
                self._forget(key, entry)
                yield key, entry.nbytes
        finally:
            for item in skipped:
                heapq.heappush(heap, item)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def total_bytes(self) -> int:
        return self._total_bytes


class _S3Entry:
    __slots__ = ("freq", "in_small", "nbytes")

    def __init__(self, nbytes: int, in_small: bool) -> None:
        self.nbytes = nbytes
        self.freq = 0
        self.in_small = in_small


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): small FIFO, main FIFO, ghost FIFO.

    New keys enter the small FIFO, or the main FIFO if the ghost FIFO remembers them.
    Each key has a hit counter capped at 3, bumped by every touch (and re-insert). To
    find a victim:

    * if small is non-empty and holds at least ``small_ratio`` of the tracked bytes (or
      main is empty), look at small's head: with at least ``promote_hits`` hits since
      insertion it moves to main's tail with its counter reset (the hits that earned
      the move are spent); otherwise it is evicted and its key recorded in the ghost;
    * else look at main's head: with a counter above 0 it is decremented and the key
      goes to main's tail; otherwise it is evicted.

    ``promote_hits=1`` follows the paper: a key accessed at least once more after its
    insertion goes to main (libCacheSim's ``move-to-main-threshold=1``).

    The ghost holds keys only, no bytes, oldest dropped first, at most
    ``max(len(main), ceil((1 - small_ratio) * tracked keys))``: the paper sizes it like
    main's capacity, and a policy does not know the tier's capacity, so the number of
    keys main holds at its target share stands in for it.

    A key vetoed by ``can_evict`` is put back where it was (the head of its queue) when
    the call returns, rather than rotated to a tail: a lease is not an access and must
    not buy a key a second lap. Promotions and main reinsertions do not ask
    ``can_evict``, since they evict nothing. Every loop step evicts, promotes (at most
    once per key), spends a hit (at most 3 per key) or sets a key aside, so a call ends
    even when every key is vetoed.

    Args:
        small_ratio: Target share of tracked bytes for the small FIFO, in (0, 1).
        promote_hits: Hits in small that move a key to main, 1 to 3.

    Raises:
        ConfigError: An argument is out of range.
    """

    __slots__ = (
        "_entries",
        "_ghost",
        "_main",
        "_promote_hits",
        "_small",
        "_small_bytes",
        "_small_ratio",
        "_total_bytes",
    )
    name: ClassVar[str] = "s3fifo"
    MAX_FREQ: ClassVar[int] = 3

    def __init__(self, small_ratio: float = 0.1, promote_hits: int = 1) -> None:
        if not 0 < small_ratio < 1:
            raise ConfigError(f"small_ratio must be in (0, 1), got {small_ratio!r}")
        if not 1 <= promote_hits <= self.MAX_FREQ:
            raise ConfigError(
                f"promote_hits must be in [1, {self.MAX_FREQ}], got {promote_hits!r}"
            )
        self._small_ratio = small_ratio
        self._promote_hits = promote_hits
        self._entries: dict[BlockKey, _S3Entry] = {}
        self._small: OrderedDict[BlockKey, None] = OrderedDict()
        self._main: OrderedDict[BlockKey, None] = OrderedDict()
        self._ghost: OrderedDict[BlockKey, None] = OrderedDict()
        self._small_bytes = 0
        self._total_bytes = 0

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        _check_nbytes(nbytes)
        entry = self._entries.get(key)
        if entry is not None:
            self._total_bytes += nbytes - entry.nbytes
            if entry.in_small:
                self._small_bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes
            entry.freq = min(entry.freq + 1, self.MAX_FREQ)
            return
        in_ghost = key in self._ghost
        if in_ghost:
            del self._ghost[key]
        self._entries[key] = _S3Entry(nbytes, in_small=not in_ghost)
        self._total_bytes += nbytes
        if in_ghost:
            self._main[key] = None
        else:
            self._small[key] = None
            self._small_bytes += nbytes

    def touch(self, key: BlockKey, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.freq = min(entry.freq + 1, self.MAX_FREQ)

    def remove(self, key: BlockKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._total_bytes -= entry.nbytes
        if entry.in_small:
            del self._small[key]
            self._small_bytes -= entry.nbytes
        else:
            del self._main[key]

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        return _first_victim(self._victims(can_evict))

    def evict_bytes(
        self, nbytes: int, now: float, can_evict: CanEvict | None = None
    ) -> list[BlockKey]:
        return _victims_for_bytes(self._victims(can_evict), nbytes)

    def in_small(self, key: BlockKey) -> bool:
        """Whether ``key`` is in the small FIFO (``False`` in main or absent)."""
        entry = self._entries.get(key)
        return entry is not None and entry.in_small

    def in_ghost(self, key: BlockKey) -> bool:
        """Whether the ghost FIFO remembers ``key`` as recently evicted from small."""
        return key in self._ghost

    def _use_small(self) -> bool:
        if not self._small:
            return False
        return not self._main or (
            self._small_bytes >= self._small_ratio * self._total_bytes
        )

    def _victims(self, can_evict: CanEvict | None) -> _Victims:
        small, main, entries = self._small, self._main, self._entries
        # Vetoed keys leave their queue for the rest of the call (so the loop moves on)
        # but keep their bytes in the counts; they return to their queue's head below.
        skipped_small: list[BlockKey] = []
        skipped_main: list[BlockKey] = []
        try:
            while small or main:
                from_small = self._use_small()
                queue = small if from_small else main
                key = next(iter(queue))
                entry = entries[key]
                if from_small and entry.freq >= self._promote_hits:
                    self._promote(key, entry)
                elif not from_small and entry.freq > 0:
                    entry.freq -= 1
                    main.move_to_end(key)
                elif can_evict is not None and not can_evict(key):
                    del queue[key]
                    (skipped_small if from_small else skipped_main).append(key)
                else:
                    self.remove(key)
                    if from_small:
                        self._remember(key)
                    yield key, entry.nbytes
        finally:
            for queue, skipped in ((small, skipped_small), (main, skipped_main)):
                for key in reversed(skipped):
                    queue[key] = None
                    queue.move_to_end(key, last=False)

    def _promote(self, key: BlockKey, entry: _S3Entry) -> None:
        del self._small[key]
        self._small_bytes -= entry.nbytes
        entry.in_small = False
        entry.freq = 0
        self._main[key] = None

    def _remember(self, key: BlockKey) -> None:
        ghost = self._ghost
        ghost[key] = None
        ghost_limit = max(
            len(self._main), math.ceil((1 - self._small_ratio) * len(self._entries))
        )
        while len(ghost) > ghost_limit:
            ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def total_bytes(self) -> int:
        return self._total_bytes


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (LRUPolicy, WeightedLRUPolicy, LeafFirstLRUPolicy, S3FIFOPolicy)
}
"""Policy name (as in config files) -> class."""


def make_policy(name: str, **options: Any) -> EvictionPolicy:
    """Builds the policy named ``name`` with its constructor ``options``.

    Args:
        name: One of the keys of :data:`POLICIES`.
        **options: Keyword arguments of that policy's constructor.

    Raises:
        ConfigError: ``name`` is unknown, an option does not exist for that policy, or
            an option's value is out of range.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"policy must be one of {list(POLICIES)}, got {name!r}")
    allowed = list(inspect.signature(cls).parameters)
    for option in options:
        if option not in allowed:
            raise ConfigError(
                f"policy {name!r} has no option {option!r}; allowed: {allowed}"
            )
    try:
        return cls(**options)
    except TypeError as exc:  # a value of the wrong type, e.g. a str weight
        raise ConfigError(f"bad option value for policy {name!r}: {exc}") from exc
