"""``lru``: least recently inserted or touched first. O(1)."""

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

__all__ = ["LRUPolicy"]


class LRUPolicy(TrackingPolicy[int]):
    """Least recently inserted or touched first.

    An ordered dict from key to size is the whole state: its head is the victim.
    """

    __slots__ = ()
    name: ClassVar[str] = "lru"
    _entries: OrderedDict[BlockKey, int]

    def __init__(self) -> None:
        super().__init__(OrderedDict())

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        check_nbytes(nbytes)
        self._total_bytes += nbytes - self._entries.get(key, 0)
        self._entries[key] = nbytes
        self._entries.move_to_end(key)

    def touch(self, key: BlockKey, now: float) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        self._total_bytes -= self._entries.pop(key, 0)

    def _victims(self, can_evict: CanEvict | None) -> Victims:
        sizes = self._entries
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
            put_back_at_head(sizes, skipped)
