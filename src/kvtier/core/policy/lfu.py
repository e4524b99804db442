"""``lfu``: least frequently used with dynamic aging (LFU-DA). O(log n).

A key's priority is its hit count plus the priority of the last victim at the time of
its latest access, so keys that were popular long ago age out.
"""

from __future__ import annotations

import heapq
from typing import ClassVar

from kvtier.core.keys import BlockKey
from kvtier.core.policy.base import CanEvict, TrackingPolicy, Victims, check_nbytes

__all__ = ["LFUPolicy"]


class _LFUEntry:
    __slots__ = ("count", "nbytes", "priority", "tick")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.count = 0
        self.priority = 0.0
        self.tick = 0


class LFUPolicy(TrackingPolicy[_LFUEntry]):
    """LFU with dynamic aging (Arlitt et al., 2000): lowest priority first.

    Each insert or touch counts one access and sets the key's priority to
    ``age + accesses``, where ``age`` is the priority of the latest victim. Plain LFU
    keeps a key that was hit a thousand times last week forever; with aging, every
    eviction raises the bar new accesses start from, so an old count is worth less and
    less against recent ones. Ties go to the key accessed least recently (a logical
    tick, not ``now``, so equal times still order deterministically).

    Keys wait in a heap of ``(priority, tick, key)`` with lazy deletion: an item is live
    while its key is tracked and its tick current; the heap is rebuilt once stale items
    outnumber live ones two to one.

    A vetoed key keeps its priority and place.
    """

    __slots__ = ("_age", "_heap", "_next_tick")
    name: ClassVar[str] = "lfu"
    _HEAP_SLACK: ClassVar[int] = 64

    def __init__(self) -> None:
        super().__init__({})
        self._heap: list[tuple[float, int, BlockKey]] = []
        self._age = 0.0
        self._next_tick = 0

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        check_nbytes(nbytes)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _LFUEntry(nbytes)
            self._total_bytes += nbytes
        else:
            self._total_bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes
        self._access(key, entry)

    def touch(self, key: BlockKey, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._access(key, entry)

    def _access(self, key: BlockKey, entry: _LFUEntry) -> None:
        entry.count += 1
        entry.priority = self._age + entry.count
        entry.tick = self._next_tick
        self._next_tick += 1
        heapq.heappush(self._heap, (entry.priority, entry.tick, key))
        if len(self._heap) > 3 * len(self._entries) + self._HEAP_SLACK:
            self._heap = [(e.priority, e.tick, k) for k, e in self._entries.items()]
            heapq.heapify(self._heap)

    def remove(self, key: BlockKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._total_bytes -= entry.nbytes

    @property
    def age(self) -> float:
        """The priority of the latest victim: where new accesses start from."""
        return self._age

    def _victims(self, can_evict: CanEvict | None) -> Victims:
        heap, entries = self._heap, self._entries
        skipped: list[tuple[float, int, BlockKey]] = []
        try:
            while heap:
                item = heapq.heappop(heap)
                priority, tick, key = item
                entry = entries.get(key)
                if entry is None or entry.tick != tick:
                    continue  # stale: removed or accessed since
                if can_evict is not None and not can_evict(key):
                    skipped.append(item)
                    continue
                del entries[key]
                self._total_bytes -= entry.nbytes
                self._age = priority
                yield key, entry.nbytes
        finally:
            for item in skipped:
                heapq.heappush(heap, item)
