"""What is stored where, and the three ways to ask: prefix, sliding window, exact batch.

The index maps a block key to an :class:`Entry`: which tiers hold the block (a bit per
tier, tier 0 the hottest), its size, the quota group it counts against, its parent in
the prompt's key chain, when it expires, and the read leases that keep it from eviction.
It holds no bytes and does no I/O; time comes in as an argument.

Match modes (Tair's manager API, seed 002):

* prefix: how many leading blocks of a prompt are stored, and the hottest tier of each;
* sliding window: for sliding-window-attention models only the last ``window`` blocks
  before the resume point are needed, so the longest resumable prefix is the longest one
  whose last ``window`` blocks are all stored;
* exact batch: which of these keys are stored, in any order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvtier.core.keys import BlockKey

__all__ = ["BlockIndex", "BlockMeta", "Entry", "MatchResult", "window_match_end"]


def window_match_end(present: Sequence[bool], window: int) -> int:
    """The longest prefix of a prompt whose last ``window`` blocks are all stored.

    ``present[i]`` says whether block ``i`` is stored; a prefix shorter than the
    window must be stored whole.
    """
    if window <= 0:
        raise ValueError(f"window must be a positive number of blocks, got {window}")
    run = 0  # stored blocks in a row ending at the current position
    end = 0
    for position, stored in enumerate(present):
        run = run + 1 if stored else 0
        if run >= min(window, position + 1):
            end = position + 1
    return end


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What a tier persists about a block beside its bytes.

    Attributes:
        nbytes: Raw size of the block in bytes.
        group: Quota group (the namespace's tenant) the block counts against.
        parent: The previous block of the prompt's key chain, if known.
        expire_at: Unix time after which the block is never returned (inf: never).
    """

    nbytes: int
    group: str = "default"
    parent: BlockKey | None = None
    expire_at: float = math.inf


@dataclass(slots=True)
class Entry:
    """The index's record of one block."""

    meta: BlockMeta
    tier_mask: int = 0
    lease_deadlines: list[float] | None = None  # one per outstanding read lease

    def in_tier(self, tier_id: int) -> bool:
        return bool(self.tier_mask >> tier_id & 1)

    @property
    def hottest_tier(self) -> int:
        """The lowest tier id holding the block (-1 if none)."""
        mask = self.tier_mask
        return (mask & -mask).bit_length() - 1

    def is_leased(self, now: float) -> bool:
        """Held by a lease that has not run out (a crashed reader's runs out)."""
        deadlines = self.lease_deadlines
        return deadlines is not None and any(now < d for d in deadlines)

    def lease(self, deadline: float) -> None:
        """Adds a read lease that lasts until ``deadline`` (``inf``: until released)."""
        if self.lease_deadlines is None:
            self.lease_deadlines = []
        self.lease_deadlines.append(deadline)

    def release(self, deadline: float) -> None:
        """Ends the lease taken with ``deadline``; ending one twice is a no-op."""
        deadlines = self.lease_deadlines
        if deadlines is not None and deadline in deadlines:
            deadlines.remove(deadline)
            if not deadlines:
                self.lease_deadlines = None


@dataclass(frozen=True, slots=True)
class MatchResult:
    """The answer of a match.

    Attributes:
        num_blocks: Leading blocks usable (prefix mode) or resumable (window mode).
        tiers: The hottest tier id of each of those blocks (prefix mode), or of
            the blocks in the window before the resume point (window mode).
    """

    num_blocks: int
    tiers: tuple[int, ...] = ()


@dataclass
class BlockIndex:
    """Key -> :class:`Entry`, with expiry order. Not thread-safe: the store locks it."""

    _entries: dict[BlockKey, Entry] = field(default_factory=dict)
    _expiry_heap: list[tuple[float, BlockKey]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def entry(self, key: BlockKey) -> Entry | None:
        """The entry of ``key`` whatever its state (expired, mid-move), or ``None``."""
        return self._entries.get(key)

    def get(self, key: BlockKey, now: float) -> Entry | None:
        """The live entry of ``key``: ``None`` when absent, in no tier, or expired."""
        entry = self._entries.get(key)
        if entry is None or entry.tier_mask == 0 or entry.meta.expire_at <= now:
            return None
        return entry

    def add(self, key: BlockKey, meta: BlockMeta, tier_id: int) -> Entry:
        """Records that ``tier_id`` holds ``key``; creates the entry on first sight."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = Entry(meta)
            if math.isfinite(meta.expire_at):
                heapq.heappush(self._expiry_heap, (meta.expire_at, key))
        entry.tier_mask |= 1 << tier_id
        return entry

    def drop_tier(self, key: BlockKey, tier_id: int) -> Entry | None:
        """Records that ``tier_id`` no longer holds ``key``; forgets it when in no tier.

        Returns:
            The entry while some tier still holds the block, else ``None``.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.tier_mask &= ~(1 << tier_id)
        if entry.tier_mask == 0:
            del self._entries[key]
            return None
        return entry

    def remove(self, key: BlockKey) -> Entry | None:
        """Forgets ``key`` in every tier; returns what was there."""
        return self._entries.pop(key, None)

    def expired(self, now: float) -> Iterator[BlockKey]:
        """Pops and yields the keys whose expiry time has passed, soonest first."""
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expire_at, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.meta.expire_at == expire_at:
                yield key

    def keys(self) -> Iterator[BlockKey]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[BlockKey, Entry]]:
        return iter(self._entries.items())

    def match_prefix(self, keys: Sequence[BlockKey], now: float) -> MatchResult:
        """How many leading ``keys`` are stored, and the hottest tier of each."""
        tiers: list[int] = []
        for key in keys:
            entry = self.get(key, now)
            if entry is None:
                break
            tiers.append(entry.hottest_tier)
        return MatchResult(len(tiers), tuple(tiers))

    def match_window(
        self, keys: Sequence[BlockKey], window: int, now: float
    ) -> MatchResult:
        """The longest prefix whose last ``window`` blocks are all stored.

        A sliding-window model resuming after block ``n`` needs only blocks
        ``n - window .. n - 1``; earlier blocks may be gone.
        """
        entries = [self.get(key, now) for key in keys]
        end = window_match_end([e is not None for e in entries], window)
        start = max(0, end - window)
        return MatchResult(end, tuple(e.hottest_tier for e in entries[start:end] if e))

    def match_exact(self, keys: Sequence[BlockKey], now: float) -> list[bool]:
        """For each key, whether it is stored."""
        return [self.get(key, now) is not None for key in keys]
