"""``leaf_lru``: LRU among blocks that no other tracked block names as its parent.

A prompt's prefix outlives its suffix, so every stored block stays reachable by a
prefix match. O(log n) amortized.
"""

from __future__ import annotations

import heapq
from typing import ClassVar

from kvtier.core.keys import BlockKey
from kvtier.core.policy.base import (
    CanEvict,
    LeafFirstPolicy,
    Victims,
    check_nbytes,
)

__all__ = ["LeafFirstLRUPolicy"]


class _LeafEntry:
    __slots__ = ("nbytes", "parent", "queued", "tick")

    def __init__(self, nbytes: int, parent: BlockKey | None, tick: int) -> None:
        self.nbytes = nbytes
        self.parent = parent
        self.tick = tick
        self.queued = False  # the heap holds (tick, key) for this tick


class LeafFirstLRUPolicy(LeafFirstPolicy[_LeafEntry]):
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

    __slots__ = ("_heap", "_next_tick")
    name: ClassVar[str] = "leaf_lru"
    _HEAP_SLACK: ClassVar[int] = 64  # no rebuilds while the heap is tiny

    def __init__(self) -> None:
        super().__init__({})
        self._heap: list[tuple[int, BlockKey]] = []
        self._next_tick = 0

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        check_nbytes(nbytes)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _LeafEntry(nbytes, None, self._next_tick)
            self._total_bytes += nbytes
        else:
            self._total_bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes
        self._link(key, entry, parent)
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

    def _requeue(self, key: BlockKey, entry: _LeafEntry) -> None:
        if not entry.queued:  # it queues at its own last access tick
            self._enqueue(key, entry)

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

    def _victims(self, can_evict: CanEvict | None) -> Victims:
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
