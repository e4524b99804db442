"""``hit_density``: leaf-first, by expected hits per byte-second, learned online.

The default policy. Built for prefix caches of multi-turn conversations, where a block
comes back when the conversation's next turn arrives, minutes later, or never: recency
alone (LRU) throws blocks out just before their turn comes. The design and the figures
behind it are in ``docs/replay.md``. O(log n) per access; an eviction looks at two
candidates per class.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from typing import ClassVar

from kvtier.core.keys import BlockKey
from kvtier.core.policy.base import (
    CanEvict,
    LeafFirstPolicy,
    Victims,
    check_nbytes,
)
from kvtier.core.policy.ghost import GhostList
from kvtier.errors import ConfigError

__all__ = ["HitDensityPolicy"]

NUM_AGE_BUCKETS = 64
"""Ages in quarter-octaves of seconds: bucket 0 is [0, 1 s), the last one ~2.4 h up."""

_BUCKET_LOW = [0.0] + [2 ** ((b - 1) / 4) for b in range(1, NUM_AGE_BUCKETS)]
_BUCKET_HIGH = [*_BUCKET_LOW[1:], _BUCKET_LOW[-1] * 2]


def age_bucket(age_s: float) -> int:
    """The age bucket of ``age_s`` seconds (negative ages, a clock step back: 0)."""
    if age_s < 1.0:
        return 0
    bucket = int(4 * math.log2(age_s)) + 1
    return bucket if bucket < NUM_AGE_BUCKETS else NUM_AGE_BUCKETS - 1


class _Entry:
    __slots__ = (
        "cls",
        "finished",
        "last_access",
        "nbytes",
        "num_accesses",
        "parent",
        "tick",
    )

    def __init__(self, nbytes: int, parent: BlockKey | None, num_accesses: int) -> None:
        self.nbytes = nbytes
        self.parent = parent
        self.num_accesses = num_accesses  # of its conversation, see the class doc
        self.last_access = 0.0
        self.tick = 0
        self.cls = 0
        self.finished = False  # the engine said so (finish), until its next use


class _ReuseStats:
    """Per class: accesses, and reuses by age bucket; what the ranking is made from."""

    __slots__ = ("densities", "num_accesses", "reuses")

    def __init__(self, num_classes: int) -> None:
        self.num_accesses = [0.0] * num_classes
        self.reuses = [[0.0] * NUM_AGE_BUCKETS for _ in range(num_classes)]
        # Until the first refresh: older is worse, as in LRU.
        self.densities = [[-low for low in _BUCKET_LOW] for _ in range(num_classes)]

    def refresh(self, horizon_s: float, decay: float) -> None:
        for cls, reuses in enumerate(self.reuses):
            accesses = self.num_accesses[cls]
            if accesses > 0:
                self.densities[cls] = _densities(reuses, accesses, horizon_s)
            self.num_accesses[cls] = accesses * decay
            self.reuses[cls] = [n * decay for n in reuses]


def _densities(reuses: list[float], accesses: float, horizon_s: float) -> list[float]:
    """Expected reuses per second of residence, per age, looking ``horizon_s`` ahead.

    For a block of age ``a`` not reused yet: the reuses expected in ``(a, a + h]``
    divided by the expected time it stays (until that reuse, or ``h`` if none). Each
    bucket's reuses are taken as spread evenly over it.
    """
    out = [0.0] * NUM_AGE_BUCKETS
    reused_before = 0.0
    for i in range(NUM_AGE_BUCKETS):
        start = _BUCKET_LOW[i]
        alive = accesses - reused_before
        reused_before += reuses[i]
        if alive <= 1e-9:
            continue
        end = start + horizon_s
        hits = stay_s = 0.0
        for j in range(i, NUM_AGE_BUCKETS):
            low, high = _BUCKET_LOW[j], _BUCKET_HIGH[j]
            if low >= end:
                break
            top = min(high, end)
            expected = reuses[j] * (top - low) / (high - low)
            hits += expected
            stay_s += expected * ((low + top) / 2 - start)
        stay_s += max(alive - hits, 0.0) * horizon_s
        out[i] = hits / stay_s if stay_s > 0 else 0.0
    return out


class HitDensityPolicy(LeafFirstPolicy[_Entry]):
    """Evicts the leaf block with the fewest expected hits per second it would stay.

    Three ideas, each measured on the conversation trace (``docs/replay.md``):

    * **Leaf first.** Only blocks that no tracked block names as parent are candidates
      (as in ``leaf_lru``): a prefix match stops at the first missing block, so an
      evicted prefix would strand its whole suffix.
    * **Conversation turns as the class.** A block's class is the number of accesses
      of its conversation: a new block inherits the count of its parent when it
      continues a chain (the parent has at most one other child: the previous turn's
      partial last block, or an edit), starts at 1 under a shared
      prefix (a system prompt every request touches), and counts its own hits after.
      A conversation on its fifth turn is about twice as likely to come back as one on
      its first, and all its blocks come back together. A block evicted and stored
      again gets its old count back (plus one), so a conversation that outlived its
      blocks keeps its standing.
    * **Hit density by age, learned online.** For each class the policy counts
      accesses and the age (seconds since the previous access) at which blocks were
      reused, including reuses of blocks it evicted (a ghost list of recent victims
      remembers their class and last access). From these it estimates, for each age,
      the reuses a block of that class and age will get within the next ``h`` seconds
      per second it occupies room (LHD, Beckmann et al., NSDI'18, with the reuse
      distribution observed rather than inferred from the policy's own evictions).
      ``h`` is the cache's turnover time, tracked keys over inserts per second: the
      time a block would stay if nothing else decided. Reuse of a conversation is most
      likely minutes after its last turn, so density first rises with age and then
      falls; the minimum among a class's leaves is its oldest or its youngest, and
      those two per class are the only candidates.

    * **Finished blocks, when the engine says so.** :meth:`finish` puts the blocks of
      a finished prompt that no other prompt shares into a class of their own, with
      its own learned densities (so a hint that proves wrong costs little): a
      conversation that is over, or a partial last block the next turn will not
      match. With those hints from the trace the conversation trace's figures rise
      from 0.38 / 0.44 / 0.59 / 0.80 / 0.97 of MIN to the ones in ``docs/replay.md``.

    Statistics are refreshed every ``refresh_accesses`` accesses and then decayed by
    ``decay``, so the policy follows a changing workload. Before the first refresh it
    behaves as leaf-first LRU. Ties go to the older candidate, then the lower class.
    Leaves wait in two heaps per class (oldest first, youngest first) with lazy
    deletion, rebuilt when stale items outnumber live ones two to one.

    A vetoed key keeps its place. The policy reads no clock: ages come from ``now``.

    Args:
        num_classes: Conversation access counts above this share the last class.
        refresh_accesses: Accesses between refreshes of the learned densities.
        decay: Weight the statistics keep at each refresh, in (0, 1].
        horizon_scale: Multiplies the turnover time to give the horizon ``h``.

    Raises:
        ConfigError: An argument is out of range.
    """

    __slots__ = (
        "_decay",
        "_ghost",
        "_heaps",
        "_horizon_scale",
        "_insert_rate",
        "_num_heap_items",
        "_inserts_since",
        "_now",
        "_num_classes",
        "_rate_since",
        "_refresh_accesses",
        "_since_refresh",
        "_stats",
        "_tick",
    )
    name: ClassVar[str] = "hit_density"
    # Victims remembered: 4 per tracked key, plus this many, so that even a small
    # tier recognizes conversations that come back minutes later (~1.3 MB of them).
    GHOST_SLACK: ClassVar[int] = 32768
    _HEAP_SLACK: ClassVar[int] = 64
    _DEFAULT_HORIZON_S: ClassVar[float] = 60.0

    def __init__(
        self,
        num_classes: int = 8,
        refresh_accesses: int = 8192,
        decay: float = 0.9,
        horizon_scale: float = 1.0,
    ) -> None:
        _check_config(num_classes, refresh_accesses, decay, horizon_scale)
        super().__init__({})
        self._num_classes = num_classes
        self._refresh_accesses = refresh_accesses
        self._decay = decay
        self._horizon_scale = horizon_scale
        self._num_heap_items = 0
        # Per class: (oldest-first heap of (tick, key), youngest-first of (-tick, key));
        # the classes by conversation accesses, then the finished class.
        self._heaps: list[tuple[list[tuple[int, BlockKey]], ...]] = [
            ([], []) for _ in range(num_classes + 1)
        ]
        # key -> (class, last access, accesses) of recent victims
        self._ghost = GhostList()
        self._stats = _ReuseStats(num_classes + 1)
        # Until its reuses are learned, a finished block goes before any other.
        self._stats.densities[num_classes] = [-1e12 - low for low in _BUCKET_LOW]
        self._tick = 0
        self._since_refresh = 0
        self._inserts_since = 0
        self._rate_since: float | None = None  # ``now`` of the last rate sample
        self._insert_rate: float | None = None  # inserts per second
        self._now = 0.0

    # ---------------------------------------------------------------- accesses

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        check_nbytes(nbytes)
        entry = self._entries.get(key)
        if entry is not None:
            self._total_bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes
            self._link(key, entry, parent)
            self.touch(key, now)
            return
        if parent == key:
            parent = None
        num_accesses = self._inherited(parent)
        remembered = self._ghost.pop(key)
        if remembered is not None:  # back after an eviction: a reuse, and its count
            cls, last_access, num_before = remembered
            self._stats.reuses[cls][age_bucket(now - last_access)] += 1
            num_accesses = max(num_accesses, num_before + 1)
        entry = self._entries[key] = _Entry(nbytes, None, num_accesses)
        self._total_bytes += nbytes
        self._link(key, entry, parent)
        self._count_insert(now)
        self._access(key, entry, now)

    def load(
        self, blocks: Iterable[tuple[BlockKey, int, BlockKey | None]], now: float
    ) -> None:
        """Inserts in order, but builds the leaf heaps once at the end, and does not
        count the blocks as arrivals (the insert rate is of new blocks)."""
        for key, nbytes, parent in blocks:
            check_nbytes(nbytes)
            if key in self._entries:
                self.insert(key, nbytes, parent, now)
                continue
            if parent == key:
                parent = None
            entry = self._entries[key] = _Entry(nbytes, None, self._inherited(parent))
            self._total_bytes += nbytes
            self._link(key, entry, parent)
            entry.last_access = now
            entry.cls = self._class_of(entry)
            entry.tick = self._tick
            self._tick += 1
            self._stats.num_accesses[entry.cls] += 1
        self._rebuild()

    def _inherited(self, parent: BlockKey | None) -> int:
        if parent is None:
            return 1
        parent_entry = self._entries.get(parent)
        if parent_entry is None or self._num_children.get(parent, 0) > 1:
            return 1  # under a shared prefix: a conversation of its own
        return parent_entry.num_accesses

    def touch(self, key: BlockKey, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        self._stats.reuses[entry.cls][age_bucket(now - entry.last_access)] += 1
        entry.num_accesses += 1
        entry.finished = False  # used after all
        self._access(key, entry, now)

    def finish(self, keys: Sequence[BlockKey], now: float) -> None:
        """Moves the finished blocks of ``keys`` no other prompt shares (from the last
        up to the first with another child) into the finished class."""
        finished_cls = self._num_classes
        counts = self._stats.num_accesses
        for key in reversed(keys):
            entry = self._entries.get(key)
            if entry is None or self._num_children.get(key, 0) > 1:
                return  # gone, or a prefix other prompts go on from
            if entry.finished:
                continue
            # Its last access counts for the class it turned out to be in.
            counts[entry.cls] = max(0.0, counts[entry.cls] - 1)
            counts[finished_cls] += 1
            entry.finished, entry.cls = True, finished_cls
            if key not in self._num_children:
                self._enqueue(key, entry)  # the old class's items are stale now
        self._maybe_rebuild()

    def _access(self, key: BlockKey, entry: _Entry, now: float) -> None:
        entry.last_access = now
        entry.cls = self._class_of(entry)
        entry.tick = self._tick
        self._tick += 1
        self._stats.num_accesses[entry.cls] += 1
        if key not in self._num_children:
            self._enqueue(key, entry)
        self._since_refresh += 1
        if self._since_refresh >= self._refresh_accesses:
            self._refresh(now)
        self._maybe_rebuild()

    def _class_of(self, entry: _Entry) -> int:
        if entry.finished:
            return self._num_classes
        return min(entry.num_accesses, self._num_classes) - 1

    def _enqueue(self, key: BlockKey, entry: _Entry) -> None:
        oldest, youngest = self._heaps[entry.cls]
        heapq.heappush(oldest, (entry.tick, key))
        heapq.heappush(youngest, (-entry.tick, key))
        self._num_heap_items += 2

    def _count_insert(self, now: float) -> None:
        self._inserts_since += 1
        if self._rate_since is None:
            self._rate_since = now

    def _refresh(self, now: float) -> None:
        self._since_refresh = 0
        if self._rate_since is not None and now > self._rate_since:
            rate = self._inserts_since / (now - self._rate_since)
            previous = self._insert_rate
            self._insert_rate = rate if previous is None else (previous + rate) / 2
            self._inserts_since, self._rate_since = 0, now
        self._stats.refresh(self.horizon_s, self._decay)

    @property
    def horizon_s(self) -> float:
        """How far ahead densities look: tracked keys over inserts per second."""
        if not self._insert_rate:
            return self._DEFAULT_HORIZON_S
        turnover_s = len(self._entries) / self._insert_rate
        return max(1.0, turnover_s * self._horizon_scale)

    def density(self, key: BlockKey, now: float) -> float:
        """The ranking of ``key`` at ``now``: lower is evicted first (diagnostics)."""
        entry = self._entries[key]
        bucket = age_bucket(now - entry.last_access)
        return self._stats.densities[entry.cls][bucket]

    def in_ghost(self, key: BlockKey) -> bool:
        """Whether ``key`` was evicted recently enough that its reuse would count."""
        return key in self._ghost

    def _requeue(self, key: BlockKey, entry: _Entry) -> None:
        self._enqueue(key, entry)

    def _maybe_rebuild(self) -> None:
        # Only outside eviction: a rebuild while _victims holds vetoed items out of the
        # heaps would queue them twice.
        if self._num_heap_items > 6 * len(self._entries) + self._HEAP_SLACK:
            self._rebuild()

    def _rebuild(self) -> None:
        """The leaf heaps anew from the entries: every leaf once, nothing stale."""
        self._heaps = [([], []) for _ in range(self._num_classes + 1)]
        for key, entry in self._entries.items():
            if key not in self._num_children:
                self._heaps[entry.cls][0].append((entry.tick, key))
                self._heaps[entry.cls][1].append((-entry.tick, key))
        for oldest, youngest in self._heaps:
            heapq.heapify(oldest)
            heapq.heapify(youngest)
        self._num_heap_items = sum(len(old) + len(new) for old, new in self._heaps)

    # ---------------------------------------------------------------- eviction

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        self._now = now
        return super().evict(now, can_evict)

    def evict_bytes(
        self, nbytes: int, now: float, can_evict: CanEvict | None = None
    ) -> list[BlockKey]:
        self._now = now
        return super().evict_bytes(nbytes, now, can_evict)

    def _victims(self, can_evict: CanEvict | None) -> Victims:
        vetoed: set[BlockKey] = set()
        skipped: list[tuple[list[tuple[int, BlockKey]], tuple[int, BlockKey]]] = []
        try:
            while True:
                best = self._best_candidate(can_evict, vetoed, skipped)
                if best is None:
                    return
                heap, key, entry = best
                heapq.heappop(heap)
                self._num_heap_items -= 1
                self._forget(key, entry)
                self._remember(key, entry)
                yield key, entry.nbytes
        finally:
            for heap, item in skipped:
                heapq.heappush(heap, item)

    def _best_candidate(
        self,
        can_evict: CanEvict | None,
        vetoed: set[BlockKey],
        skipped: list[tuple[list[tuple[int, BlockKey]], tuple[int, BlockKey]]],
    ) -> tuple[list[tuple[int, BlockKey]], BlockKey, _Entry] | None:
        best: tuple[float, int, int] | None = None
        found: tuple[list[tuple[int, BlockKey]], BlockKey, _Entry] | None = None
        for cls, heaps in enumerate(self._heaps):
            if not heaps[0]:
                continue  # both heaps hold the same keys: empty together
            densities = self._stats.densities[cls]
            for young, heap in enumerate(heaps):
                head = self._head(heap, cls, young, can_evict, vetoed, skipped)
                if head is None:
                    continue
                key, entry = head
                rank = (
                    densities[age_bucket(self._now - entry.last_access)],
                    young,
                    cls,
                )
                if best is None or rank < best:
                    best, found = rank, (heap, key, entry)
        return found

    def _head(
        self,
        heap: list[tuple[int, BlockKey]],
        cls: int,
        young: int,
        can_evict: CanEvict | None,
        vetoed: set[BlockKey],
        skipped: list[tuple[list[tuple[int, BlockKey]], tuple[int, BlockKey]]],
    ) -> tuple[BlockKey, _Entry] | None:
        """The live, allowed head of ``heap``, dropping stale items on the way."""
        sign = -1 if young else 1
        while heap:
            tick, key = heap[0]
            entry = self._entries.get(key)
            if (
                entry is None
                or entry.tick != sign * tick
                or entry.cls != cls
                or key in self._num_children
            ):
                heapq.heappop(heap)  # stale: gone, accessed since, or no leaf now
                self._num_heap_items -= 1
                continue
            if key in vetoed or (can_evict is not None and not can_evict(key)):
                vetoed.add(key)
                skipped.append((heap, heapq.heappop(heap)))
                continue
            return key, entry
        return None

    def _remember(self, key: BlockKey, entry: _Entry) -> None:
        self._ghost.add(key, entry.cls, entry.last_access, entry.num_accesses)
        self._ghost.trim(4 * len(self._entries) + self.GHOST_SLACK)


def _check_config(
    num_classes: int, refresh_accesses: int, decay: float, horizon_scale: float
) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not isinstance(refresh_accesses, int) or refresh_accesses < 1:
        raise ConfigError(
            f"refresh_accesses must be an integer >= 1, got {refresh_accesses!r}"
        )
    if not (isinstance(decay, int | float) and 0 < decay <= 1):
        raise ConfigError(f"decay must be in (0, 1], got {decay!r}")
    if not (isinstance(horizon_scale, int | float) and 0 < horizon_scale < math.inf):
        raise ConfigError(f"horizon_scale must be a number > 0, got {horizon_scale!r}")
