"""The memory tier: one preallocated arena, size-class slots, no per-block objects.

The arena is one ``mmap`` viewed as a numpy ``uint8`` array: anonymous memory, or, when
a server shares it with same-host clients, a ``memfd``: an anonymous in-memory file the
node passes to clients over a Unix socket. A memfd has no name in ``/dev/shm``, so a
node that is SIGKILLed leaks nothing: the memory goes when the last process unmaps it.

A block is an offset and a length into the arena; reading or writing one is a single
``numpy.copyto`` on a view, so the hot path allocates no ``bytes`` and copies each
payload exactly once. Transparent huge pages are requested for the arena: a 2 MiB block
then costs one page fault, not 512 (for a memfd only where the kernel's
``shmem_enabled`` allows it).

Writes are two-phase so the copy can run outside the store's lock and, later, in another
process: :meth:`reserve` takes a slot that no reader can see, the caller fills it, and
:meth:`commit` publishes it (or :meth:`abort` gives it back).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

import numpy as np

from kvtier._pinning import advise_huge_pages
from kvtier.core.alloc import SlabAllocator
from kvtier.core.keys import BlockKey
from kvtier.errors import StorageError, StoreClosedError

__all__ = ["MemoryTier"]


class MemoryTier:
    """Blocks in one arena. Not thread-safe: the store serializes calls.

    Args:
        capacity_bytes: Size of the arena.
        slab_bytes: Target slab size of the allocator.
        shared: Back the arena with a memfd (:attr:`fd`) other processes can map.
        huge_pages: Ask the kernel for transparent huge pages.

    Raises:
        StorageError: The shared arena cannot be created.
    """

    name = "memory"

    def __init__(
        self,
        capacity_bytes: int,
        *,
        slab_bytes: int = 4 << 20,
        shared: bool = False,
        huge_pages: bool = True,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.fd: int | None = _memfd(capacity_bytes) if shared else None
        # Nothing touches the arena page by page here: mapping 16 GiB is instant and
        # pages are faulted in by the first writes into them.
        self._mmap = mmap.mmap(-1 if self.fd is None else self.fd, capacity_bytes)
        if huge_pages:
            advise_huge_pages(self._mmap)
        self.arena: np.ndarray[Any, np.dtype[np.uint8]] = np.frombuffer(
            self._mmap, dtype=np.uint8
        )
        self._alloc = SlabAllocator(capacity_bytes, slab_bytes)
        self._slots: dict[BlockKey, tuple[int, int]] = {}  # key -> (offset, nbytes)
        self._closed = False

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    @property
    def used_bytes(self) -> int:
        """Bytes of allocated slots (size classes included)."""
        return self._alloc.used_bytes

    def slot_bytes(self, offset: int) -> int:
        """Bytes the slot at ``offset`` takes from the arena."""
        return self._alloc.slot_size(offset)

    def can_reserve(self, nbytes: int) -> bool:
        return self._alloc.can_allocate(nbytes)

    def reserve(self, nbytes: int) -> int | None:
        """A slot for ``nbytes``, unseen until committed; ``None`` if full."""
        self._check_open()
        return self._alloc.allocate(nbytes)

    def commit(self, key: BlockKey, offset: int, nbytes: int) -> None:
        """Publishes a filled slot under ``key``."""
        assert key not in self._slots, "a key is committed to memory twice"
        self._slots[key] = (offset, nbytes)

    def abort(self, offset: int) -> None:
        """Gives back a reserved slot that will not be committed."""
        self._alloc.free(offset)

    def location(self, key: BlockKey) -> tuple[int, int] | None:
        """``(offset, nbytes)`` of a committed block."""
        return self._slots.get(key)

    def detach(self, key: BlockKey) -> int | None:
        """Unpublishes ``key`` but keeps its slot (a reader may still copy from it).

        Returns:
            The slot's offset, to pass to :meth:`release_slot` once no reader holds it.
        """
        slot = self._slots.pop(key, None)
        return None if slot is None else slot[0]

    def release_slot(self, offset: int) -> None:
        """Frees a detached slot."""
        self._alloc.free(offset)

    def view(self, offset: int, nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """A writable ``uint8`` view of ``nbytes`` at ``offset`` (no copy)."""
        return self.arena[offset : offset + nbytes]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._slots.clear()
        del self.arena  # the mmap refuses to close while numpy views export it
        with contextlib.suppress(BufferError):  # a view outlives us: freed at exit
            self._mmap.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the memory tier is closed")


def _memfd(capacity_bytes: int) -> int:
    try:
        fd = os.memfd_create("kvtier-arena", os.MFD_CLOEXEC)
    except (AttributeError, OSError) as exc:
        raise StorageError(f"cannot create a shared memory arena: {exc}") from exc
    try:
        os.ftruncate(fd, capacity_bytes)
    except OSError as exc:
        os.close(fd)
        raise StorageError(
            f"cannot size the shared memory arena to {capacity_bytes} bytes: {exc}"
        ) from exc
    return fd
