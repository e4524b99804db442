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
        if nbytes < 0:
            check_nbytes(nbytes)
        entries = self._entries
        old_bytes = entries.get(key)
        entries[key] = nbytes
        if old_bytes is None:
            self._total_bytes += nbytes  # a new key is appended: already the newest
        else:
            self._total_bytes += nbytes - old_bytes
            entries.move_to_end(key)

    def touch(self, key: BlockKey, now: float) -> None:
        # try/except, not a membership test first or contextlib.suppress: on a hit
        # (the common case) it is the cheapest; the replay loop runs it per block.
        try:  # noqa: SIM105
            self._entries.move_to_end(key)
        except KeyError:  # absent: a no-op
            pass

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        if can_evict is not None or not self._entries:
            return super().evict(now, can_evict)
        # The common case, without a victims generator: the trace simulator replays
        # millions of evictions through this method.
        key, key_bytes = self._entries.popitem(last=False)
        self._total_bytes -= key_bytes
        return key

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
