"""Offsets in one preallocated arena: size-class slots carved from slabs.

The memory tier keeps every block in one big buffer (later a shared-memory segment a
same-host client maps), so a block is an offset, never a Python ``bytes`` object. This
module does the bookkeeping of those offsets and nothing else.

* A request of ``n`` bytes is rounded up to its size class: a multiple of
  ``max(64, 2**(floor(log2 n) - 3))``, so internal waste stays under 12.5% and classes
  of KV blocks (powers of two in practice) waste nothing.
* Slots of one class live in slabs of about ``slab_bytes`` (a block at least that large
  is
  its own single-slot slab). A slab whose slots are all free returns to the arena's free
  extents, which coalesce with their neighbours, so one class can give memory to
  another.

Rejected: one first-fit extent per block for every size, which fragments with many small
blocks and makes each free a sorted-list operation; and fixed pages per class
(memcached), which strand memory in classes no longer used.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["SlabAllocator", "slot_bytes"]

_ALIGN = 64


def slot_bytes(nbytes: int) -> int:
    """The size class of an ``nbytes`` request."""
    if nbytes <= 0:
        raise ValueError(f"a slot needs a positive size, got {nbytes}")
    step = max(_ALIGN, 1 << max(nbytes.bit_length() - 4, 0))
    return -(-nbytes // step) * step


@dataclass(slots=True)
class _Slab:
    start: int
    slot_bytes: int
    num_slots: int
    free_slots: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.slot_bytes * self.num_slots


class SlabAllocator:
    """Allocates slots of an arena of ``arena_bytes``. Not thread-safe."""

    def __init__(self, arena_bytes: int, slab_bytes: int = 4 << 20) -> None:
        if arena_bytes <= 0 or slab_bytes <= 0:
            raise ValueError(
                f"arena_bytes and slab_bytes must be positive, got {arena_bytes}, "
                f"{slab_bytes}"
            )
        self.arena_bytes = arena_bytes
        self.slab_bytes = slab_bytes
        self.used_bytes = 0  # bytes of allocated slots (class sizes)
        self._extent_starts: list[int] = [0]  # free extents, sorted by start
        self._extent_sizes: dict[int, int] = {0: arena_bytes}
        self._partial: dict[int, list[_Slab]] = {}  # class -> slabs with free slots
        self._owner: dict[int, _Slab] = {}  # allocated slot offset -> its slab

    @property
    def free_extent_bytes(self) -> int:
        """Bytes in no slab at all."""
        return sum(self._extent_sizes.values())

    def can_allocate(self, nbytes: int) -> bool:
        """Whether :meth:`allocate` would succeed now, without changing anything."""
        size = slot_bytes(nbytes)
        if self._partial.get(size):
            return True
        need = self._slab_size(size)
        return any(extent >= need for extent in self._extent_sizes.values())

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a free slot of at least ``nbytes``; ``None`` if none fits."""
        size = slot_bytes(nbytes)
        slabs = self._partial.get(size)
        if not slabs:
            slab = self._new_slab(size)
            if slab is None:
                return None
            slabs = self._partial.setdefault(size, [])
            slabs.append(slab)
        slab = slabs[-1]
        offset = slab.free_slots.pop()
        if not slab.free_slots:
            slabs.pop()
        self._owner[offset] = slab
        self.used_bytes += size
        return offset

    def free(self, offset: int) -> None:
        """Returns a slot; a slab whose slots are all free goes back to the arena."""
        slab = self._owner.pop(offset)
        self.used_bytes -= slab.slot_bytes
        slabs = self._partial.setdefault(slab.slot_bytes, [])
        if not slab.free_slots:
            slabs.append(slab)
        slab.free_slots.append(offset)
        if len(slab.free_slots) == slab.num_slots:
            slabs.remove(slab)
            self._free_extent(slab.start, slab.size)

    def slot_size(self, offset: int) -> int:
        """The class size of the allocated slot at ``offset``."""
        return self._owner[offset].slot_bytes

    def _slab_size(self, size: int) -> int:
        return size * max(1, self.slab_bytes // size)

    def _new_slab(self, size: int) -> _Slab | None:
        slab_size = self._slab_size(size)
        start = self._take_extent(slab_size)
        if start is None and slab_size > size:  # fall back to a smaller slab
            slab_size = size
            start = self._take_extent(slab_size)
        if start is None:
            return None
        num_slots = slab_size // size
        slots = [start + i * size for i in range(num_slots - 1, -1, -1)]
        return _Slab(start, size, num_slots, slots)

    def _take_extent(self, size: int) -> int | None:
        """First fit: the lowest free extent that holds ``size`` bytes."""
        for start in self._extent_starts:
            extent = self._extent_sizes[start]
            if extent >= size:
                self._extent_starts.remove(start)
                del self._extent_sizes[start]
                if extent > size:
                    self._insert_extent(start + size, extent - size)
                return start
        return None

    def _free_extent(self, start: int, size: int) -> None:
        starts = self._extent_starts
        pos = bisect.bisect_left(starts, start)
        if pos < len(starts) and start + size == starts[pos]:  # merge the next one
            size += self._extent_sizes.pop(starts.pop(pos))
        if pos > 0:
            prev = starts[pos - 1]
            if prev + self._extent_sizes[prev] == start:  # merge into the previous one
                self._extent_sizes[prev] += size
                return
        self._insert_extent(start, size)

    def _insert_extent(self, start: int, size: int) -> None:
        bisect.insort(self._extent_starts, start)
        self._extent_sizes[start] = size
