"""``s3fifo``: S3-FIFO (Yang et al., SOSP'23). O(1) amortized.

A small FIFO filters one-hit wonders, a main FIFO reinserts lazily, and a ghost FIFO
remembers keys recently evicted from small.
"""

from __future__ import annotations

import math
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
from kvtier.core.policy.ghost import GhostList
from kvtier.errors import ConfigError

__all__ = ["S3FIFOPolicy"]


class _S3Entry:
    __slots__ = ("freq", "in_small", "nbytes")

    def __init__(self, nbytes: int, in_small: bool) -> None:
        self.nbytes = nbytes
        self.freq = 0
        self.in_small = in_small


class S3FIFOPolicy(TrackingPolicy[_S3Entry]):
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

    The ghost holds key fingerprints only, no bytes, oldest dropped first, at most
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
        "_ghost",
        "_main",
        "_promote_hits",
        "_small",
        "_small_bytes",
        "_small_ratio",
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
        super().__init__({})
        self._small_ratio = small_ratio
        self._promote_hits = promote_hits
        self._small: OrderedDict[BlockKey, None] = OrderedDict()
        self._main: OrderedDict[BlockKey, None] = OrderedDict()
        self._ghost = GhostList()
        self._small_bytes = 0

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        check_nbytes(nbytes)
        entry = self._entries.get(key)
        if entry is None:
            self._admit(key, nbytes)
            return
        self._total_bytes += nbytes - entry.nbytes
        if entry.in_small:
            self._small_bytes += nbytes - entry.nbytes
        entry.nbytes = nbytes
        entry.freq = min(entry.freq + 1, self.MAX_FREQ)

    def _admit(self, key: BlockKey, nbytes: int) -> None:
        in_ghost = self._ghost.pop(key) is not None
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

    def _victims(self, can_evict: CanEvict | None) -> Victims:
        small, main, entries = self._small, self._main, self._entries
        # Vetoed keys leave their queue for the rest of the call (so the loop moves on)
        # but keep their bytes in the counts; they return to their queue's head below.
        skipped_small: list[tuple[BlockKey, None]] = []
        skipped_main: list[tuple[BlockKey, None]] = []
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
                    skipped = skipped_small if from_small else skipped_main
                    skipped.append((key, queue.pop(key)))
                else:
                    self.remove(key)
                    if from_small:
                        self._remember(key)
                    yield key, entry.nbytes
        finally:
            put_back_at_head(small, skipped_small)
            put_back_at_head(main, skipped_main)

    def _promote(self, key: BlockKey, entry: _S3Entry) -> None:
        del self._small[key]
        self._small_bytes -= entry.nbytes
        entry.in_small = False
        entry.freq = 0
        self._main[key] = None

    def _remember(self, key: BlockKey) -> None:
        self._ghost.add(key, 0, 0.0, 0)
        self._ghost.trim(
            max(
                len(self._main), math.ceil((1 - self._small_ratio) * len(self._entries))
            )
        )
