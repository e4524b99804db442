"""A compact FIFO memory of evicted keys, for the policies that learn from reuse.

A ghost list grows to its bound and stays there, so its per-key cost is what a node
pays for it in steady state. An ``OrderedDict`` of keys to tuples costs ~240 bytes a
key (the key itself, the tuple, the float, the node); this table costs ~40: a ring of
64-bit fingerprints with three value columns in ``array`` buffers, and an
open-addressing index (linear probing, backward-shift deletion) over the ring.

Keys are remembered by ``hash(key)``; two keys sharing a 64-bit fingerprint would share
a record. A ghost record only steers statistics and admission, never which bytes are
served, so that chance (~n/2**64 per lookup) is harmless.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable

__all__ = ["GhostList"]

_EMPTY = 0  # index slot holding nothing; others hold ring position + 1
_MIN_RING = 64


class GhostList:
    """Keys with an ``(int, float, int)`` record each, the oldest dropped first.

    The record's second int must be >= 0 (a negative one marks a hole in the ring).

    ``add`` appends (or refreshes) a key at the young end, ``pop`` takes one out from
    anywhere, ``trim`` drops the oldest until at most ``limit`` remain. All O(1)
    amortized; the ring grows by half when it fills and never shrinks, so memory
    follows the largest bound the owner asked for.
    """

    __slots__ = (
        "_count",
        "_fps",
        "_head",
        "_index",
        "_ints",
        "_live",
        "_span",
        "_times",
    )

    def __init__(self) -> None:
        self._fps = array("q", bytes(8 * _MIN_RING))
        self._ints = array("q", bytes(8 * _MIN_RING))  # first int of the record
        self._times = array("d", bytes(8 * _MIN_RING))
        self._count = array("q", bytes(8 * _MIN_RING))  # second int; -1 marks a hole
        self._index = array("q", bytes(8 * 2 * _MIN_RING))
        self._head = 0  # ring position of the oldest slot
        self._span = 0  # slots from head to the young end, holes included
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def __contains__(self, key: Hashable) -> bool:
        return self._find(hash(key))[1] >= 0

    def add(self, key: Hashable, first: int, time: float, second: int) -> None:
        """Remembers ``key`` with its record, as the youngest (replacing an old one)."""
        fp = hash(key)
        slot, pos = self._find(fp)
        if pos >= 0:
            self._remove(slot, pos)
        if self._span == len(self._fps):
            self._grow()
        pos = (self._head + self._span) % len(self._fps)
        self._span += 1
        self._live += 1
        self._fps[pos], self._ints[pos] = fp, first
        self._times[pos], self._count[pos] = time, second
        slot = self._find(fp)[0]
        self._index[slot] = pos + 1

    def pop(self, key: Hashable) -> tuple[int, float, int] | None:
        """Forgets ``key`` and returns its record, or ``None`` if not remembered."""
        slot, pos = self._find(hash(key))
        if pos < 0:
            return None
        record = (self._ints[pos], self._times[pos], self._count[pos])
        self._remove(slot, pos)
        return record

    def trim(self, limit: int) -> None:
        """Drops the oldest keys until at most ``limit`` are remembered."""
        while self._live > limit:  # the head is live: holes are skipped at once
            self._remove(*self._find(self._fps[self._head]))

    def _find(self, fp: int) -> tuple[int, int]:
        """(``fp``'s index slot or the empty one where it would go, ring pos or -1)."""
        index, fps = self._index, self._fps
        mask = len(index) - 1
        slot = fp & mask
        while True:
            held = index[slot]
            if held == _EMPTY:
                return slot, -1
            if fps[held - 1] == fp:
                return slot, held - 1
            slot = (slot + 1) & mask

    def _remove(self, slot: int, pos: int) -> None:
        """Forgets the key at ring ``pos``, indexed at ``slot``."""
        self._count[pos] = -1
        self._live -= 1
        self._unindex(slot)
        self._skip_holes()

    def _skip_holes(self) -> None:
        ring, count = len(self._fps), self._count
        while self._span and count[self._head] < 0:
            self._head = (self._head + 1) % ring
            self._span -= 1
        if not self._span:
            self._head = 0

    def _unindex(self, slot: int) -> None:
        """Empties ``slot``, shifting back the probe run after it (no tombstones)."""
        index, fps = self._index, self._fps
        mask = len(index) - 1
        here = slot
        while True:
            slot = (slot + 1) & mask
            held = index[slot]
            if held == _EMPTY:
                break
            home = fps[held - 1] & mask
            # Move it back unless its home lies cyclically in (here, slot].
            if (here < slot and here < home <= slot) or (
                slot < here and (home > here or home <= slot)
            ):
                continue
            index[here] = held
            here = slot
        index[here] = _EMPTY

    def _grow(self) -> None:
        """Lays the live slots out afresh, oldest first; the ring grows by half unless
        holes were most of what filled it."""
        old = len(self._fps)
        order = [(self._head + i) % old for i in range(self._span)]
        order = [pos for pos in order if self._count[pos] >= 0]
        size = old if len(order) < old // 2 else old + old // 2
        fill = bytes(8 * (size - len(order)))
        self._fps = array("q", [self._fps[p] for p in order]) + array("q", fill)
        self._ints = array("q", [self._ints[p] for p in order]) + array("q", fill)
        self._times = array("d", [self._times[p] for p in order]) + array("d", fill)
        self._count = array("q", [self._count[p] for p in order]) + array("q", fill)
        width = 2 * _MIN_RING
        while width < 2 * size:
            width *= 2
        self._index = array("q", bytes(8 * width))
        self._head, self._span = 0, len(order)
        for pos in range(len(order)):
            self._index[self._find(self._fps[pos])[0]] = pos + 1
