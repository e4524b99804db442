"""``arc``: Adaptive Replacement Cache (Megiddo and Modha, FAST'03). O(1) amortized.

Two LRU lists split recency from frequency, and two ghost lists of recently evicted
keys move the split to whichever side would have kept the key.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

from kvtier.core.keys import BlockKey
from kvtier.core.policy.base import (
    CanEvict,
    TrackingPolicy,
    Victims,
    check_nbytes,
    put_back_at_head,
)

__all__ = ["ARCPolicy"]


class ARCPolicy(TrackingPolicy[int]):
    """ARC: keys seen once (T1) and keys seen again (T2), balanced by two ghosts.

    A new key enters T1; a hit moves it to T2's most recent end. ``evict`` takes T1's
    least recent key while T1 holds more than the target ``p`` keys (or T2 is empty),
    else T2's; each victim's key is remembered in the ghost of its list (B1, B2).
    Inserting a key B1 remembers means T1 was too small: ``p`` grows by
    ``max(1, |B2| / |B1|)``; a key from B2 shrinks it by ``max(1, |B1| / |B2|)``;
    either way the key enters T2, as in the paper.

    The paper's cache size ``c`` is a number of pages fixed in advance; a policy here
    does not know its tier's capacity, so the number of tracked keys stands in for it
    (a full tier tracks about as many keys as fit): ``p`` stays within ``[0, c]``,
    ``|T1| + |B1| <= c`` and all four lists hold at most ``2c`` keys. Sizes count
    keys, not bytes: the blocks of one KV layout are all the same size.

    A key vetoed by ``can_evict`` keeps its place (a lease is not an access).
    """

    __slots__ = ("_b1", "_b2", "_t1", "_t2", "_target")
    name: ClassVar[str] = "arc"
    _entries: dict[BlockKey, int]

    def __init__(self) -> None:
        super().__init__({})
        self._t1: OrderedDict[BlockKey, None] = OrderedDict()
        self._t2: OrderedDict[BlockKey, None] = OrderedDict()
        self._b1: OrderedDict[BlockKey, None] = OrderedDict()
        self._b2: OrderedDict[BlockKey, None] = OrderedDict()
        self._target = 0.0  # p: the number of keys T1 should hold

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        check_nbytes(nbytes)
        old_bytes = self._entries.get(key)
        if old_bytes is not None:
            self._total_bytes += nbytes - old_bytes
            self._entries[key] = nbytes
            self.touch(key, now)
            return
        self._entries[key] = nbytes
        self._total_bytes += nbytes
        if key in self._b1 or key in self._b2:
            self._adapt(key)
            self._t2[key] = None
        else:
            self._t1[key] = None
        self._trim_ghosts()

    def _adapt(self, key: BlockKey) -> None:
        size = len(self._entries)
        num_b1, num_b2 = len(self._b1), len(self._b2)
        if key in self._b1:
            del self._b1[key]
            self._target = min(size, self._target + max(1.0, num_b2 / num_b1))
        else:
            del self._b2[key]
            self._target = max(0.0, self._target - max(1.0, num_b1 / num_b2))

    def _trim_ghosts(self) -> None:
        size = len(self._entries)
        while self._b1 and len(self._t1) + len(self._b1) > size:
            self._b1.popitem(last=False)
        while self._b2 and size + len(self._b1) + len(self._b2) > 2 * size:
            self._b2.popitem(last=False)

    def touch(self, key: BlockKey, now: float) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        nbytes = self._entries.pop(key, None)
        if nbytes is None:
            return
        self._total_bytes -= nbytes
        if key in self._t1:
            del self._t1[key]
        else:
            del self._t2[key]

    def in_t2(self, key: BlockKey) -> bool:
        """Whether ``key`` was hit since it entered (ARC's frequency list)."""
        return key in self._t2

    def in_ghost(self, key: BlockKey) -> bool:
        """Whether a ghost list (B1 or B2) remembers ``key`` as recently evicted."""
        return key in self._b1 or key in self._b2

    @property
    def target(self) -> float:
        """How many keys the recency list T1 should hold now (the paper's ``p``)."""
        return self._target

    def _victims(self, can_evict: CanEvict | None) -> Victims:
        t1, t2 = self._t1, self._t2
        skipped1: list[tuple[BlockKey, None]] = []
        skipped2: list[tuple[BlockKey, None]] = []
        try:
            while t1 or t2:
                from_t1 = bool(t1) and (
                    len(t1) + len(skipped1) > self._target or not t2
                )
                queue, ghost = (t1, self._b1) if from_t1 else (t2, self._b2)
                key = next(iter(queue))
                del queue[key]
                if can_evict is not None and not can_evict(key):
                    (skipped1 if from_t1 else skipped2).append((key, None))
                    continue
                nbytes = self._entries.pop(key)
                self._total_bytes -= nbytes
                ghost[key] = None
                self._trim_ghosts()
                yield key, nbytes
        finally:
            put_back_at_head(t1, skipped1)
            put_back_at_head(t2, skipped2)
