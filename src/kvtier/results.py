"""What the store's calls answer: put results, matches, block listings, statistics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kvtier.core.keys import BlockKey

__all__ = [
    "jsonable",
    "BlockInfo",
    "BlockLease",
    "Match",
    "PutResult",
    "Reservation",
    "Slot",
    "SlotStatus",
    "StoreStats",
    "TierStats",
]


@dataclass(frozen=True)
class PutResult:
    """Which blocks of a put are now stored. Truthy when all are."""

    stored: tuple[bool, ...]

    def __bool__(self) -> bool:
        return all(self.stored)

    @property
    def num_stored(self) -> int:
        return sum(self.stored)


SlotStatus = Literal["reserved", "stored", "refused"]


@dataclass(frozen=True, slots=True)
class Slot:
    """One block of a two-phase write.

    Attributes:
        key: The block (``None`` in a reservation made ahead of its keys).
        status: ``reserved`` (write ``nbytes`` at ``offset`` of the memory arena, then
            commit), ``stored`` (already stored or being written by another writer:
            nothing to do) or ``refused`` (no room).
        offset: Byte offset in the arena when reserved, else -1.
        nbytes: Size of the block.
    """

    key: BlockKey | None
    status: SlotStatus
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Reservation:
    """Slots reserved for a two-phase write, until ``commit`` or ``abort``.

    A reservation neither committed nor aborted by ``deadline`` is aborted by the
    store's sweep, so a writer that dies leaks nothing.
    """

    reservation_id: int
    slots: tuple[Slot, ...]
    deadline: float

    @property
    def reserved(self) -> tuple[Slot, ...]:
        """The slots to fill."""
        return tuple(slot for slot in self.slots if slot.status == "reserved")


@dataclass(frozen=True)
class Match:
    """How much of a prompt is stored.

    Attributes:
        num_blocks: Leading blocks stored (prefix) or resumable (sliding window).
        tiers: The hottest tier holding each matched block (window mode: each block of
            the window before the resume point).
    """

    num_blocks: int
    tiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockInfo:
    """One stored block, as ``TieredStore.list`` reports it."""

    key: BlockKey
    nbytes: int
    group: str
    tiers: tuple[str, ...]
    expire_at: float


class BlockLease:
    """Blocks leased for reading in place, straight out of the memory arena.

    ``views[i]`` is a read-only ``uint8`` view of block ``keys[i]`` at ``offsets[i]``
    of the arena, valid until the lease is released or runs out
    (``store.lease_seconds``): after that its slot may hold another block, so a
    reader checks :meth:`expired` after copying out. Release it with :meth:`release`
    or a ``with`` block.
    """

    def __init__(
        self,
        keys: tuple[BlockKey, ...],
        offsets: tuple[int, ...],
        views: list[np.ndarray[Any, Any]],
        deadline: float,
        release: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.offsets = offsets
        self.views = views
        self.deadline = deadline
        self._release: Callable[[], None] | None = release
        self._clock = clock

    def expired(self) -> bool:
        """Whether the lease has run out: call it when a copy out of the views is
        done. ``False`` means the copy read the leased blocks; ``True`` that their
        slots may have been reused meanwhile, so what was copied must be thrown
        away (a miss)."""
        return self._clock() >= self.deadline

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    def release(self) -> None:
        """Ends the lease (idempotent); the views must not be used afterwards."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> BlockLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class TierStats:
    """Counters and gauges of one tier.

    Attributes:
        capacity_bytes: The tier's byte budget.
        used_bytes: Bytes of blocks the tier holds (or is being written).
        num_blocks: Blocks the tier holds.
        hits: Blocks served from this tier.
        evictions: Blocks evicted from this tier (memory: demoted to disk).
        blocks_written / bytes_written: Blocks and bytes written into this tier.
        bytes_read: Bytes served from this tier.
        num_corrupt: Blocks that failed their checksum and were quarantined.
        write_failures: Writes the tier refused (full disk, I/O error).
        compactions: For the disk tier, segments compacted since it was opened.
        healthy: For a remote tier, whether it answers (a failing one is skipped).
        errors: For a remote tier, calls that failed.
    """

    name: str
    capacity_bytes: int = 0
    used_bytes: int = 0
    num_blocks: int = 0
    hits: int = 0
    evictions: int = 0
    blocks_written: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    num_corrupt: int = 0
    write_failures: int = 0
    compactions: int = 0
    healthy: bool = True
    errors: int = 0


@dataclass
class StoreStats:
    """A snapshot of the store's counters.

    Attributes:
        tiers: Per tier (hottest first).
        lookups: Reads (get / get_into) served.
        hit_blocks / miss_blocks: Blocks those reads found / did not find.
        put_blocks: Blocks newly stored by puts.
        refused_blocks: Blocks a put could not store (no room).
        expired_blocks: Blocks removed because their time passed.
        promotions: Blocks copied up into memory after a lower-tier hit.
        demotions: Blocks written to disk because memory evicted them.
        dirty_blocks: Blocks in memory not yet written to the lower tiers.
        open_reservations: Two-phase writes reserved and not yet committed or
            aborted (0 when idle: a dead writer's run out).
        held_slots: Memory slots some reader holds (0 when idle: a dead reader's
            leases run out).
        group_bytes: Per tier, bytes held per quota group (the namespaces' tenants).
        group_blocks: Per tier, blocks held per quota group.
    """

    tiers: dict[str, TierStats]
    lookups: int = 0
    hit_blocks: int = 0
    miss_blocks: int = 0
    put_blocks: int = 0
    refused_blocks: int = 0
    expired_blocks: int = 0
    promotions: int = 0
    demotions: int = 0
    dirty_blocks: int = 0
    open_reservations: int = 0
    held_slots: int = 0
    group_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    group_blocks: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def hit_ratio(self) -> float:
        """Blocks found over blocks looked up (0.0 before any lookup)."""
        total = self.hit_blocks + self.miss_blocks
        return self.hit_blocks / total if total else 0.0


def jsonable(obj: Any) -> Any:
    """Results as JSON-able data: dataclasses to dicts, bytes to hex, inf to None."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: jsonable(v) for k, v in vars(obj).items() if not k.startswith("_")}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
