"""Where each block lives, and moving blocks between tiers. Called under the store lock.

:class:`Placement` is the store's locked state: the ledger (residency, policies,
budgets, quotas), the memory tier's slots, the set of dirty blocks (in memory, not yet
written below) and the holds readers have on memory slots. Every method expects the
caller to hold the store's lock; the bytes of a put or a get move outside it, in
:mod:`kvtier.store`.

Holds on slots: a reader copying from a memory slot holds it, so the slot is not reused
even if its block is deleted, expired or evicted meanwhile. A hold ends when the reader
releases it or, for readers outside this process (``lease_seconds``), when its deadline
passes: a crashed reader leaks nothing. A block whose lease has run out is evictable,
and a detached slot whose holds have all run out is freed by
:meth:`Placement.expire_holds`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.config import Config
from kvtier.core.alloc import slot_bytes
from kvtier.core.index import BlockMeta, Entry
from kvtier.core.keys import BlockKey
from kvtier.core.ledger import Ledger, TierAccount
from kvtier.core.policy import make_policy
from kvtier.errors import StorageError
from kvtier.results import StoreStats
from kvtier.tiers import LocalTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.remote import Guarded

__all__ = [
    "DISK",
    "LOCAL_TIERS",
    "MEMORY",
    "Lease",
    "Pending",
    "Placement",
    "Write",
    "accounts",
]

log = logging.getLogger(__name__)

MEMORY, DISK = 0, 1
LOCAL_TIERS = ("memory", "disk")

Array = np.ndarray[Any, Any]


@dataclass(slots=True)
class SlotHold:
    """The readers of one memory slot: the deadline of each one's lease."""

    offset: int
    deadlines: list[float] = field(default_factory=list)
    detached: bool = False  # its block is gone; free the slot when the readers are

    @property
    def readers(self) -> int:
        return len(self.deadlines)

    @property
    def deadline(self) -> float:
        """When the last of its readers' leases runs out (one released is gone
        from it: an unbounded reader that released must not keep it forever)."""
        return max(self.deadlines, default=0.0)


@dataclass(frozen=True, slots=True)
class Lease:
    """One reader's hold on a block, and on its memory slot when it has one."""

    key: BlockKey
    entry: Entry
    deadline: float
    location: tuple[int, int] | None
    hold: SlotHold | None


@dataclass(slots=True)
class Pending:
    """Slots a writer is filling, until commit, abort or the deadline."""

    # key (None: reserved ahead, not named yet), meta, arena offset
    blocks: list[tuple[BlockKey | None, BlockMeta, int]]
    deadline: float


@dataclass(frozen=True, slots=True)
class Write:
    """One dirty block on its way to the lower tiers."""

    key: BlockKey
    payload: Array
    meta: BlockMeta
    lease: Lease
    to_disk: bool


class Placement:
    """The store's locked state and the moves between tiers. Not thread-safe."""

    def __init__(
        self,
        ledger: Ledger,
        memory: MemoryTier,
        disk: LocalTier | None,
        remotes: list[Guarded],
        stats: StoreStats,
    ) -> None:
        self.ledger = ledger
        self.index = ledger.index
        self.memory = memory
        self.disk = disk
        self.remotes = remotes
        self.stats = stats
        self.has_lower = disk is not None or bool(remotes)
        self.dirty: dict[BlockKey, None] = {}  # in memory, not yet below; in order
        self.dirty_bytes = 0
        self.reserving: dict[BlockKey, int] = {}  # key -> reservation filling it
        self.pending: dict[int, Pending] = {}  # reservation id -> its slots
        self.unnamed_bytes = 0  # slots reserved ahead of their keys
        self.writes_in_flight = 0  # blocks the writer has leased to write below
        self._next_reservation = 1
        self._holds: dict[int, SlotHold] = {}  # memory offset -> its readers

    # ------------------------------------------------------------- memory slots

    def reserve_slot(self, meta: BlockMeta, now: float) -> int | None:
        """A memory slot for a new block, evicting as needed; ``None`` if no room
        (which may change once :attr:`writes_in_flight` are done: their blocks are
        leased until then)."""
        if not self.ledger.fits_ever(MEMORY, meta):
            return None
        self.make_room(MEMORY, meta, now)
        if not self.ledger.has_room(MEMORY, meta):
            return None  # what is left of the group's quota is leased
        offset = self.memory.reserve(meta.nbytes)
        while offset is None:  # fragmented, or all that is left is leased
            if not self.evict(MEMORY, slot_bytes(meta.nbytes), now):
                return None
            offset = self.memory.reserve(meta.nbytes)
        self.ledger.hold(MEMORY, meta)
        return offset

    def reserve_free_slot(self, meta: BlockMeta) -> int | None:
        """A memory slot from room that is free now (within the tier's capacity and
        the group's quota), evicting nothing; ``None`` if there is none."""
        if not self.ledger.has_room(MEMORY, meta):
            return None
        offset = self.memory.reserve(meta.nbytes)
        if offset is not None:
            self.ledger.hold(MEMORY, meta)
        return offset

    def open_reservation(self, deadline: float) -> int:
        reservation_id = self._next_reservation
        self._next_reservation += 1
        self.pending[reservation_id] = Pending([], deadline)
        return reservation_id

    def add_to_reservation(
        self, reservation_id: int, key: BlockKey, meta: BlockMeta, offset: int
    ) -> None:
        self.pending[reservation_id].blocks.append((key, meta, offset))
        self.reserving[key] = reservation_id

    def add_unnamed(self, reservation_id: int, meta: BlockMeta, offset: int) -> None:
        """A slot reserved ahead of a put whose keys are not known yet (see
        :meth:`name`)."""
        self.pending[reservation_id].blocks.append((None, meta, offset))
        self.unnamed_bytes += slot_bytes(meta.nbytes)

    def name(
        self,
        reservation_id: int,
        keys: list[BlockKey],
        metas: list[BlockMeta],
        is_stored: Callable[[BlockKey], bool],
    ) -> list[bool] | None:
        """Names the first slots of a reservation made ahead: block ``i`` of ``keys``
        is in slot ``i``. A key stored already (or being written) gives its slot
        back, as do the slots left over. Returns, per key, whether its slot is now
        the key's to commit; ``None`` if the reservation is gone.

        The caller has checked that each meta's size and quota group are its slot's
        (the slot's bytes are held against that group).
        """
        pending = self.pending.get(reservation_id)
        if pending is None:
            return None
        named: list[tuple[BlockKey | None, BlockMeta, int]] = []
        mine: list[bool] = []
        for i, (unnamed, held, offset) in enumerate(pending.blocks):
            if unnamed is None:
                self.unnamed_bytes -= slot_bytes(held.nbytes)
            key = keys[i] if i < len(keys) else None
            ok = key is not None and key not in self.reserving and not is_stored(key)
            if ok:
                assert key is not None
                self.reserving[key] = reservation_id
                named.append((key, metas[i], offset))
            else:
                self.memory.abort(offset)
                self.ledger.unhold(MEMORY, held)
            if key is not None:
                mine.append(ok)
        pending.blocks = named
        return mine

    def commit(self, reservation_id: int, now: float) -> list[BlockKey]:
        """Publishes a reservation's filled slots; returns their keys (none if gone).
        Slots reserved ahead and never named are given back."""
        pending = self.pending.pop(reservation_id, None)
        if pending is None:
            return []  # aborted, or its deadline passed and the sweep took it
        committed = []
        for key, meta, offset in pending.blocks:
            if key is None:
                self.unnamed_bytes -= slot_bytes(meta.nbytes)
                self.memory.abort(offset)
                self.ledger.unhold(MEMORY, meta)
                continue
            del self.reserving[key]
            self.memory.commit(key, offset, meta.nbytes)
            entry = self.ledger.charge(MEMORY, key, meta, now, held=True)
            if self.has_lower and not entry.in_tier(DISK):
                self.dirty[key] = None
                self.dirty_bytes += meta.nbytes
            committed.append(key)
        return committed

    def abort(self, reservation_id: int) -> int:
        """Gives a reservation's slots back; returns how many."""
        pending = self.pending.pop(reservation_id, None)
        if pending is None:
            return 0
        for key, meta, offset in pending.blocks:
            if key is None:
                self.unnamed_bytes -= slot_bytes(meta.nbytes)
            else:
                del self.reserving[key]
            self.memory.abort(offset)
            self.ledger.unhold(MEMORY, meta)
        return len(pending.blocks)

    def expire_reservations(self, now: float) -> int:
        """Aborts reservations past their deadline (their writer died or hung)."""
        stale = [rid for rid, p in self.pending.items() if p.deadline <= now]
        return sum(self.abort(rid) for rid in stale)

    def undirty(self, key: BlockKey) -> None:
        if self.dirty.pop(key, 0) is None:
            entry = self.index.entry(key)
            assert entry is not None, "a dirty block has an index entry"
            self.dirty_bytes -= entry.meta.nbytes

    def free_memory(self, key: BlockKey, now: float) -> None:
        """Drops the memory copy of ``key``; a slot still being read waits for it."""
        offset = self.memory.detach(key)
        if offset is None:
            return
        hold = self._holds.get(offset)
        if hold is not None and hold.readers and hold.deadline > now:
            hold.detached = True
        else:
            self._holds.pop(offset, None)
            self.memory.release_slot(offset)
        self.ledger.discharge(MEMORY, key)

    # ------------------------------------------------------------- leases

    def acquire(self, key: BlockKey, entry: Entry, deadline: float) -> Lease:
        """Holds ``key`` against eviction, and its memory slot against reuse."""
        entry.lease(deadline)
        location = self.memory.location(key)
        hold = None
        if location is not None:
            hold = self._holds.get(location[0])
            if hold is None:
                hold = self._holds[location[0]] = SlotHold(location[0])
            hold.deadlines.append(deadline)
        return Lease(key, entry, deadline, location, hold)

    def lease_prefix(
        self, keys: Sequence[BlockKey], now: float, deadline: float
    ) -> list[Lease]:
        """Leases the leading stored blocks of ``keys``."""
        leases = []
        for key in keys:
            entry = self.index.get(key, now)
            if entry is None:
                break
            leases.append(self.acquire(key, entry, deadline))
        return leases

    def release(self, lease: Lease) -> None:
        """Ends a lease; a slot detached meanwhile is freed by its last reader."""
        lease.entry.release(lease.deadline)
        hold = lease.hold
        if hold is None or self._holds.get(hold.offset) is not hold:
            return  # no slot, or the hold ran out and the slot was freed already
        if lease.deadline in hold.deadlines:  # (released twice: once only)
            hold.deadlines.remove(lease.deadline)
        if not hold.deadlines:
            del self._holds[hold.offset]
            if hold.detached:
                self.memory.release_slot(hold.offset)

    @property
    def held_slots(self) -> int:
        """Memory slots some reader holds now."""
        return len(self._holds)

    def expire_holds(self, now: float) -> int:
        """Frees detached slots whose readers' leases all ran out; returns how many."""
        stale = [h for h in self._holds.values() if h.detached and h.deadline <= now]
        for hold in stale:
            del self._holds[hold.offset]
            self.memory.release_slot(hold.offset)
        return len(stale)

    # ------------------------------------------------------------- eviction

    def make_room(self, tier_id: int, meta: BlockMeta, now: float) -> None:
        """Evicts so ``meta`` fits under the watermarks of its group and tier."""
        group_bytes, _ = self.ledger.room_needed(tier_id, meta)
        if group_bytes:
            self.evict(tier_id, group_bytes, now, meta.group)
        _, tier_bytes = self.ledger.room_needed(tier_id, meta)
        if tier_bytes:
            self.evict(tier_id, tier_bytes, now)

    def evict(
        self, tier_id: int, nbytes: int, now: float, group: str | None = None
    ) -> int:
        """Evicts about ``nbytes`` from a tier; returns how many blocks went."""
        victims = self.ledger.victims(tier_id, nbytes, now, group)
        if tier_id == MEMORY:
            self._demote(victims, now)
        else:
            self.drop_disk(victims)
        self.stats.tiers[LOCAL_TIERS[tier_id]].evictions += len(victims)
        return len(victims)

    def _demote(self, keys: list[BlockKey], now: float) -> None:
        """Writes memory victims not yet below to the lower tiers, then frees them.

        The write happens under the lock; write-behind keeps such victims rare.
        """
        dirty = [key for key in keys if key in self.dirty]
        if dirty:
            writes = [self.plan_write(key, now) for key in dirty]
            self.finish_writes(writes, *self.write_below(writes), now)
            self.stats.demotions += sum(w.to_disk for w in writes)
        for key in keys:
            self.free_memory(key, now)

    def drop_disk(self, keys: Sequence[BlockKey]) -> None:
        if keys and self.disk is not None:
            self.disk.delete(keys)
            for key in keys:
                self.ledger.discharge(DISK, key)

    def forget_disk_copy(self, key: BlockKey) -> None:
        """The disk tier lost ``key`` (corrupt, quarantined): stop counting it."""
        self.stats.tiers["disk"].num_corrupt += 1
        self.ledger.discharge(DISK, key)

    def remove(self, key: BlockKey, now: float) -> bool:
        """Removes a block from every local tier; False if it was not stored."""
        if key not in self.index:
            return False
        self.undirty(key)
        self.free_memory(key, now)
        if self.ledger.holds(DISK, key):
            self.drop_disk([key])
        self.index.remove(key)
        return True

    # ------------------------------------------------------------- writing below

    def take_dirty(
        self, keys: Sequence[BlockKey] | None, now: float, max_bytes: int
    ) -> list[Write]:
        """Plans writes of ``keys`` (or of the oldest dirty blocks, up to max_bytes)."""
        writes: list[Write] = []
        batch_bytes = 0
        for key in list(self.dirty) if keys is None else keys:
            if key in self.dirty:
                writes.append(self.plan_write(key, now))
                batch_bytes += writes[-1].meta.nbytes
                if keys is None and batch_bytes >= max_bytes:
                    break
        return writes

    def plan_write(self, key: BlockKey, now: float) -> Write:
        """Leases a dirty block and holds room for it on disk."""
        entry = self.index.entry(key)
        location = self.memory.location(key)
        assert entry is not None and location is not None, "dirty blocks are in memory"
        self.undirty(key)  # in flight now; a failed write leaves it memory-only
        to_disk = self.disk is not None and self.ledger.fits_ever(DISK, entry.meta)
        if to_disk:
            self.make_room(DISK, entry.meta, now)
            to_disk = self.ledger.has_room(DISK, entry.meta)
            if to_disk:
                self.ledger.hold(DISK, entry.meta)
        lease = self.acquire(key, entry, float("inf"))
        self.writes_in_flight += 1  # until finish_writes
        return Write(key, self.memory.view(*location), entry.meta, lease, to_disk)

    def write_below(self, writes: list[Write]) -> tuple[list[bool], dict[str, int]]:
        """The I/O: disk takes the writes it has room for, each remote tier all.

        Safe without the lock: the blocks are leased and only read.

        Returns:
            Per write, whether it reached disk; and per remote tier, how many it
            refused.
        """
        items = [(w.key, w.payload, w.meta) for w in writes]
        remote_failures = {r.name: r.write(items).count(False) for r in self.remotes}
        if self.disk is None:
            return [False] * len(writes), remote_failures
        to_disk = [item for item, w in zip(items, writes, strict=True) if w.to_disk]
        results = iter(self._write_disk(to_disk) if to_disk else [])
        return [next(results) if w.to_disk else False for w in writes], remote_failures

    def _write_disk(self, items: list[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        """The disk tier refuses what it cannot write itself; an error escaping it
        still refuses the batch, never fails the put or stops the writer."""
        assert self.disk is not None
        try:
            return self.disk.write(items)
        except (OSError, StorageError) as exc:
            log.warning("disk write of %d blocks failed: %s", len(items), exc)
            return [False] * len(items)  # counted as write failures by the caller

    def finish_writes(
        self,
        writes: list[Write],
        oks: list[bool],
        remote_failures: dict[str, int],
        now: float,
    ) -> None:
        """Records what reached disk and releases the writes' leases.

        ``oks`` may be empty when the I/O raised: nothing reached disk.
        """
        for name, failures in remote_failures.items():
            self.stats.tiers[name].write_failures += failures
        self.writes_in_flight -= len(writes)
        oks = oks or [False] * len(writes)
        for write, ok in zip(writes, oks, strict=True):
            self.release(write.lease)
            if write.to_disk:
                self._record_disk_write(write, ok, now)

    def _record_disk_write(self, write: Write, ok: bool, now: float) -> None:
        stats = self.stats.tiers["disk"]
        entry = self.index.entry(write.key)
        if ok and entry is not None and not entry.in_tier(DISK):
            self.ledger.charge(DISK, write.key, write.meta, now, held=True)
            stats.blocks_written += 1
            stats.bytes_written += write.meta.nbytes
            return
        self.ledger.unhold(DISK, write.meta)
        if ok and entry is None and self.disk is not None:
            self.disk.delete([write.key])  # deleted while it was being written
        elif not ok:
            stats.write_failures += 1


def accounts(config: Config, with_disk: bool) -> list[TierAccount]:
    """Each local tier's policy, budget and quotas, as ``config`` sets them."""
    marks = (config.store.high_watermark, config.store.low_watermark)
    quotas = config.store.quotas
    tiers = [
        TierAccount.create(
            make_policy(config.memory.policy),
            config.memory.capacity_bytes,
            {g: q.memory_bytes for g, q in quotas.items()},
            *marks,
        )
    ]
    if with_disk:
        tiers.append(
            TierAccount.create(
                make_policy(config.disk.policy),
                config.disk.capacity_bytes,
                {g: q.disk_bytes for g, q in quotas.items()},
                *marks,
            )
        )
    return tiers
