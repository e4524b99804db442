"""TieredStore: put / get / match / delete / prefetch over memory, disk, remote tiers.

Tier 0 is memory, tier 1 local disk, both indexed here; the remote tiers below them
(a shared filesystem, Redis, S3, a peer node: ``remote.urls``) are not, since other
nodes write there too: they are asked directly, in order, once the local tiers run out.
The :class:`~kvtier.core.ledger.Ledger` keeps each local tier's residency, policy,
budget and quotas in step; this module moves the bytes.

Locking: one lock guards the ledger and the memory allocator. Payload bytes never move
under it: a put reserves slots under the lock, copies outside it and publishes under it;
a get leases its blocks under the lock, copies outside it and releases them. A leased
block is never evicted, and a block deleted or expired while leased keeps its memory
slot until its last reader lets go. The one exception: memory evicting a block that has
not reached disk yet writes it there under the lock (write-behind keeps that rare).

Write policies (``store.write_policy``): *write_through* writes each put to the lower
tiers before returning; *write_behind* (default) lets a background writer drain recent
puts in batches, and a put that finds more than ``write_queue_bytes`` waiting writes
itself; *write_back* writes a block down only when memory evicts it (or on close).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from kvtier._placement import DISK, LOCAL_TIERS, MEMORY, Lease, Placement, accounts
from kvtier.config import Config
from kvtier.core.alloc import slot_bytes
from kvtier.core.index import BlockIndex, BlockMeta
from kvtier.core.keys import BlockKey, KeyChain
from kvtier.core.ledger import Ledger
from kvtier.errors import LayoutError, StorageError, StoreClosedError
from kvtier.layout import KVLayout, block_arrays, copy_block, writable_bytes
from kvtier.results import (
    BlockInfo,
    BlockLease,
    Match,
    PutResult,
    Reservation,
    Slot,
    StoreStats,
    TierStats,
)
from kvtier.tiers import Tiers, open_tiers

__all__ = ["TieredStore"]

log = logging.getLogger(__name__)

_WRITER_BATCH_BYTES = 64 << 20
_WRITER_WAIT_S = 5.0  # most a reservation waits for the writer to free room


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# A reader in this process cannot die apart from the store, so its lease needs no
# clock: it ends in a finally. Clock-bounded leases are for readers elsewhere (lease()).
_UNTIL_RELEASED = math.inf

Array = np.ndarray[Any, Any]
Target = Callable[[int], Array]


class TieredStore:
    """The embedded KV-cache store. Thread-safe. Open it with :func:`kvtier.open`.

    Args:
        config: The configuration; see ``docs/configuration.md``.
        clock: Source of the current Unix time (tests pass a fake one).
        tiers: The tiers, opened already (``open_tiers(config)``, some of them
            wrapped, as :mod:`kvtier.chaos.faults` does); default: what ``config``
            asks for. The store closes them.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: Callable[[], float] = time.time,
        tiers: Tiers | None = None,
    ) -> None:
        self.config = config = config or Config()
        self._clock = clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._closed = False
        self._memory, self._disk, self._remotes = tiers or open_tiers(config)
        self._ledger = Ledger(BlockIndex(), accounts(config, self._disk is not None))
        self._index = self._ledger.index
        self._stats = StoreStats({name: TierStats(name) for name in self.tier_names})
        self._place = Placement(
            self._ledger, self._memory, self._disk, self._remotes, self._stats
        )
        self._reload_disk()
        self._prefetcher = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="kvtier-prefetch"
        )
        self._threads = [
            threading.Thread(target=self._cleanup_loop, name="kvtier-ttl", daemon=True)
        ]
        if self._place.has_lower and config.store.write_policy == "write_behind":
            self._threads.append(
                threading.Thread(
                    target=self._writer_loop, name="kvtier-writer", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()

    @property
    def tier_names(self) -> tuple[str, ...]:
        """Names of the tiers, hottest first."""
        names = ["memory"]
        if self._disk is not None:
            names.append("disk")
        names += [remote.name for remote in self._remotes]
        return tuple(names)

    def _reload_disk(self) -> None:
        """Rebuilds the index and the disk policy from what the disk tier persisted."""
        if self._disk is None:
            return
        now = self._clock()
        expired: list[BlockKey] = []

        def live() -> Iterator[tuple[BlockKey, BlockMeta]]:
            assert self._disk is not None
            for key, meta in self._disk.entries():
                if meta.expire_at <= now:
                    expired.append(key)
                else:
                    yield key, meta

        self._ledger.load(DISK, live(), now)
        if expired:
            self._disk.delete(expired)
            self._stats.expired_blocks += len(expired)

    # ------------------------------------------------------------------ put

    def put(
        self,
        keys: Sequence[BlockKey],
        blocks: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> PutResult:
        """Stores blocks under their keys.

        A key already stored counts as stored and is only touched: blocks are content
        addressed, equal keys mean equal KV. Blocks land in memory; the write policy
        takes them down to disk and the remote tiers.

        Args:
            keys: One key per block. A :class:`~kvtier.KeyChain` also gives each
                block's parent (for prefix-aware eviction) and its quota group.
            blocks: numpy arrays, torch tensors or bytes-like objects.
            layout: When given, every block must match it (dtype, shape, bytes).

        Returns:
            Which blocks are stored. A block refused for lack of room is ``False``
            and leaves the store as it was.

        Raises:
            LayoutError: A block does not match ``layout`` (the message names what
                was expected and what came), or keys and blocks differ in number.
        """
        arrays = block_arrays(keys, blocks, layout)
        metas = self._metas(keys, [arr.nbytes for arr in arrays], self._clock())
        return self._store(list(keys), arrays, metas, promote=False)

    def _metas(
        self, keys: Sequence[BlockKey], sizes: Sequence[int], now: float
    ) -> list[BlockMeta]:
        ttl = self.config.store.kv_expire_time
        expire_at = now + ttl if ttl > 0 else math.inf
        group, parents = "default", [None] * len(keys)
        if isinstance(keys, KeyChain):
            parents = keys.parents()  # type: ignore[assignment]
            group = keys.quota_group
        return [
            BlockMeta(nbytes, group, parent, expire_at)
            for nbytes, parent in zip(sizes, parents, strict=True)
        ]

    def set_quota(
        self, group: str, memory_bytes: int | None, disk_bytes: int | None
    ) -> None:
        """Sets (or, with ``None``, lifts) a quota group's limits per tier.

        Blocks already over a lowered limit stay until the group's next put evicts.
        """
        with self._lock:
            self._ledger.accounts[MEMORY].quotas.set_limit(group, memory_bytes)
            if self._disk is not None:
                self._ledger.accounts[DISK].quotas.set_limit(group, disk_bytes)

    # Queries a server asks before a call, to run it on its event loop when it cannot
    # touch a disk, and in a worker thread when it might.

    def reserve_needs_io(self, nbytes: int, group: str = "default") -> bool:
        """Whether reserving ``nbytes`` more for ``group`` might write evicted blocks
        to disk, or wait for the writer to let go of the blocks it is writing."""
        with self._lock:
            room = self._ledger.room_needed(MEMORY, BlockMeta(nbytes, group))
            busy = bool(self._place.dirty) or self._place.writes_in_flight > 0
            return any(room) and busy

    def commit_needs_io(self) -> bool:
        """Whether a commit might write to disk (write-through, or backpressure)."""
        policy = self.config.store.write_policy
        if not self._place.has_lower:
            return False
        if policy == "write_through":
            return True
        return self._place.dirty_bytes > self.config.store.write_queue_bytes

    def lease_needs_io(self, keys: Sequence[BlockKey]) -> bool:
        """Whether leasing ``keys`` might read from disk (some leading block is not
        in memory)."""
        return any(tier != "memory" for tier in self.match(keys).tiers)

    def reserve(
        self,
        keys: Sequence[BlockKey],
        sizes: Sequence[int],
        *,
        timeout: float | None = None,
    ) -> Reservation:
        """Two-phase write, step one: slots in the memory arena to write blocks into.

        For writers that copy straight into the arena (a same-host client mapping it,
        a socket receiving into it): fill each ``reserved`` slot through
        :meth:`arena_view`, then :meth:`commit`, or :meth:`abort`.

        Args:
            keys: One key per block (a :class:`~kvtier.KeyChain` gives parents and the
                quota group).
            sizes: The size of each block in bytes.
            timeout: Seconds before an uncommitted reservation is aborted by the
                sweep (default ``store.reservation_timeout``).
        """
        if len(keys) != len(sizes):
            raise LayoutError(f"got {len(keys)} keys but {len(sizes)} sizes")
        now = self._clock()
        if timeout is None:
            timeout = self.config.store.reservation_timeout
        metas = self._metas(keys, sizes, now)
        return self._reserve(list(keys), metas, now + timeout, promote=False)

    def reserve_ahead(
        self,
        sizes: Sequence[int],
        group: str = "default",
        *,
        timeout: float | None = None,
    ) -> Reservation:
        """Slots for a put whose keys are not known yet: a same-host client keeps
        one put's worth reserved between puts, so that its next put is one round
        trip (copy, then :meth:`commit_as`) instead of two.

        The slots come from free room only (nothing is evicted for them) and are
        held against ``group``'s quota: as many of ``sizes`` as there is room for,
        in order, within ``store.reserve_ahead_fraction`` of the memory tier for all
        such reservations together. Their keys are ``None``. A reservation with no
        slot is not kept.
        """
        now = self._clock()
        if timeout is None:
            timeout = self.config.store.reservation_timeout
        deadline = now + timeout
        share = self.config.store.reserve_ahead_fraction * self._memory.capacity_bytes
        slots = []
        with self._lock:
            self._check_open()
            place = self._place
            budget = share - place.unnamed_bytes
            reservation_id = place.open_reservation(deadline)
            for nbytes in sizes:
                budget -= slot_bytes(nbytes)
                if budget < 0:
                    break
                meta = BlockMeta(nbytes, group)
                # Free room only: evicting for a put that may never come would drop
                # blocks just put (all of a group's, when its quota is one put).
                offset = place.reserve_free_slot(meta)
                if offset is None:
                    break
                place.add_unnamed(reservation_id, meta, offset)
                slots.append(Slot(None, "reserved", offset, nbytes))
            if not slots:
                place.abort(reservation_id)
        return Reservation(reservation_id, tuple(slots), deadline)

    def commit_as(
        self,
        reservation: Reservation,
        keys: Sequence[BlockKey],
        sizes: Sequence[int],
    ) -> PutResult:
        """Commits a :meth:`reserve_ahead` reservation as the blocks of ``keys``, of
        ``sizes`` bytes: block ``i`` was written into slot ``i``. Keys stored
        already are not replaced (as with :meth:`put`); slots beyond ``len(keys)``
        are given back.

        Raises:
            LayoutError: Not a reservation made ahead, more keys than slots, or a
                block's size or quota group is not its slot's (nothing is committed;
                the reservation stays open).
        """
        slots = reservation.slots
        if any(slot.key is not None for slot in slots):
            raise LayoutError("commit_as names slots reserved ahead; use commit")
        if len(keys) != len(sizes) or len(keys) > len(slots):
            raise LayoutError(
                f"{len(keys)} keys and {len(sizes)} sizes for a reservation of "
                f"{len(slots)} slots"
            )
        for i, (size, slot) in enumerate(zip(sizes, slots, strict=False)):
            if size != slot.nbytes:
                raise LayoutError(
                    f"block {i} holds {size} bytes, its slot {slot.nbytes}"
                )
        now = self._clock()
        metas = self._metas(keys, sizes, now)
        with self._lock:
            pending = self._place.pending.get(reservation.reservation_id)
            if pending is not None:
                for meta, (_, held, _) in zip(metas, pending.blocks, strict=False):
                    if meta.group != held.group:
                        raise LayoutError(
                            f"quota group {meta.group!r}: the slots were reserved "
                            f"for {held.group!r}"
                        )
            mine = self._place.name(
                reservation.reservation_id,
                list(keys),
                metas,
                lambda key: self._ledger.touch(key, now),
            )
        if mine is None:  # aborted, or the sweep took it
            return PutResult(tuple(False for _ in keys))
        named = Reservation(
            reservation.reservation_id,
            tuple(
                Slot(key, "reserved" if ok else "stored", slot.offset, slot.nbytes)
                for key, ok, slot in zip(keys, mine, slots, strict=False)
            ),
            reservation.deadline,
        )
        return self._commit(named, promote=False)

    def commit(self, reservation: Reservation) -> PutResult:
        """Two-phase write, step two: publishes the filled slots.

        Returns:
            Which blocks of the reservation are stored (``False`` for refused slots,
            and for all of them when the reservation was aborted or ran out).
        """
        return self._commit(reservation, promote=False)

    def abort(self, reservation: Reservation) -> None:
        """Gives back a reservation's slots without publishing them."""
        with self._lock:
            self._place.abort(reservation.reservation_id)

    @property
    def arena_fd(self) -> int | None:
        """The memfd of a shared memory arena (``memory.shared``), else ``None``."""
        return self._memory.fd

    @property
    def arena_bytes(self) -> int:
        return self._memory.capacity_bytes

    def arena_view(self, offset: int, nbytes: int) -> Array:
        """A writable ``uint8`` view of the arena (to fill reserved slots)."""
        return self._memory.view(offset, nbytes)

    def _reserve(
        self,
        keys: list[BlockKey],
        metas: Sequence[BlockMeta],
        deadline: float,
        *,
        promote: bool,
    ) -> Reservation:
        """A put skips keys stored in any tier; a promotion (the bytes came from a
        lower tier and stay there) skips keys already in memory."""
        now, started = self._clock(), time.monotonic()
        place = self._place
        slots = []
        with self._lock:
            self._check_open()
            reservation_id = place.open_reservation(deadline)
            for key, meta in zip(keys, metas, strict=True):
                while True:  # again after waiting: the key may be stored by now
                    if key in place.reserving or (
                        key in self._memory if promote else self._ledger.touch(key, now)
                    ):
                        slots.append(Slot(key, "stored", -1, meta.nbytes))
                        break
                    offset = place.reserve_slot(meta, now)
                    if offset is not None:
                        place.add_to_reservation(reservation_id, key, meta, offset)
                        slots.append(Slot(key, "reserved", offset, meta.nbytes))
                        break
                    if (
                        promote
                        or not self._ledger.fits_ever(MEMORY, meta)
                        or not self._wait_for_writer(started)
                        or reservation_id not in place.pending  # swept meanwhile
                        or self._closed
                    ):
                        slots.append(Slot(key, "refused", -1, meta.nbytes))
                        break
            if not promote:
                self._stats.refused_blocks += sum(s.status == "refused" for s in slots)
        return Reservation(reservation_id, tuple(slots), deadline)

    def _wait_for_writer(self, started: float) -> bool:
        """Under the lock, with no room for a block: waits for the writer's blocks in
        flight (leased, so they cannot be evicted; all of a small quota group's can
        be), up to ``_WRITER_WAIT_S`` from ``started`` (``time.monotonic()``).
        Whether to try again."""
        left = started + _WRITER_WAIT_S - time.monotonic()
        if self._place.writes_in_flight <= 0 or self._closed or left <= 0:
            return False
        if _on_event_loop():
            return False  # never hold up a server's loop (its caller misjudged)
        self._work.wait(left)
        return True

    def _commit(self, reservation: Reservation, *, promote: bool) -> PutResult:
        with self._lock:
            committed = set(
                self._place.commit(reservation.reservation_id, self._clock())
            )
            if promote:
                self._stats.promotions += len(committed)
            else:
                self._stats.put_blocks += len(committed)
            if self._place.dirty:
                self._work.notify_all()
        result = PutResult(
            tuple(s.status == "stored" or s.key in committed for s in reservation.slots)
        )
        if not promote:
            self._write_down([s.key for s in reservation.slots if s.key in committed])
        return result

    def _write_down(self, keys: list[BlockKey]) -> None:
        """Applies the write policy to blocks just committed."""
        policy = self.config.store.write_policy
        if self._place.has_lower and policy == "write_through":
            self._flush(keys)
        elif policy == "write_behind" and (
            self._place.dirty_bytes > self.config.store.write_queue_bytes
        ):
            self._flush(None)  # the writer is behind: this put helps (backpressure)

    def _store(
        self,
        keys: list[BlockKey],
        arrays: Sequence[Array],
        metas: Sequence[BlockMeta],
        *,
        promote: bool,
    ) -> PutResult:
        """Reserves slots, copies into them outside the lock, commits."""
        reservation = self._reserve(keys, metas, _UNTIL_RELEASED, promote=promote)
        try:
            for slot, arr in zip(reservation.slots, arrays, strict=True):
                if slot.status == "reserved":
                    copy_block(self._memory.view(slot.offset, arr.nbytes), arr)
        except BaseException:
            self.abort(reservation)
            raise
        return self._commit(reservation, promote=promote)

    # ------------------------------------------------------ writing below

    def _writer_loop(self) -> None:
        while True:
            with self._lock:
                while not self._place.dirty and not self._closed:
                    self._work.wait()
                if self._closed:
                    return  # close() flushes what is left itself
            self._flush(None)

    def _flush(self, keys: Sequence[BlockKey] | None) -> None:
        """Writes dirty blocks (``keys``, or a batch of the oldest) to the lower tiers.

        The blocks are leased, so they stay put while the lock is released for the I/O.
        """
        now = self._clock()
        with self._lock:
            writes = self._place.take_dirty(keys, now, _WRITER_BATCH_BYTES)
        if not writes:
            return
        oks: list[bool] = []
        remote_failures: dict[str, int] = {}
        try:
            oks, remote_failures = self._place.write_below(writes)
        finally:
            with self._lock:
                self._place.finish_writes(writes, oks, remote_failures, now)
                self._work.notify_all()  # reservers waiting for room

    # ------------------------------------------------------------------ get

    def get(
        self, keys: Sequence[BlockKey], *, layout: KVLayout | None = None
    ) -> list[Array]:
        """Copies out the leading stored blocks of ``keys``.

        Returns:
            One new array per leading hit (shaped by ``layout`` when given, else flat
            ``uint8``); shorter than ``keys`` from the first miss on.
        """
        outs: list[Array] = []

        def allocate(nbytes: int) -> Array:
            outs.append(np.empty(nbytes, dtype=np.uint8))
            return outs[-1]

        outs = outs[: self._read(keys, allocate)]
        return [layout.view(a) for a in outs] if layout is not None else outs

    def get_into(
        self,
        keys: Sequence[BlockKey],
        outs: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> int:
        """Copies the leading stored blocks of ``keys`` into caller buffers.

        Args:
            keys: Keys of consecutive blocks.
            outs: One writable buffer per key (numpy array, CPU torch tensor,
                bytearray).
            layout: When given, every buffer must match it.

        Returns:
            How many leading blocks were copied; buffers past those are untouched.

        Raises:
            LayoutError: A buffer's size differs from its block's, or from ``layout``.
        """
        if len(outs) < len(keys):
            raise LayoutError(f"got {len(keys)} keys but only {len(outs)} buffers")
        targets = iter(enumerate(writable_bytes(out, layout) for out in outs))

        def next_target(nbytes: int) -> Array:
            position, target = next(targets)
            if target.nbytes != nbytes:
                raise LayoutError(
                    f"buffer #{position} holds {target.nbytes} bytes, "
                    f"the block has {nbytes}"
                )
            return target

        return self._read(keys, next_target)

    def _read(
        self, keys: Sequence[BlockKey], target: Target, count: bool = True
    ) -> int:
        """Copies leading hits into ``target(nbytes)`` buffers; returns how many.

        ``count`` is False for prefetches, which are no request's lookups.
        """
        now = self._clock()
        with self._lock:
            self._check_open()
            leases = self._place.lease_prefix(keys, now, _UNTIL_RELEASED)
        copied = 0
        from_disk: list[tuple[BlockKey, Array]] = []
        try:
            for lease in leases:
                out = target(lease.entry.meta.nbytes)
                if lease.location is not None:
                    np.copyto(out, self._memory.view(*lease.location))
                elif self._read_disk(lease.key, out):
                    from_disk.append((lease.key, out))
                else:
                    break
                copied += 1
        finally:
            with self._lock:
                self._finish_read(leases, copied, now)
        self._promote(from_disk)
        if copied == len(leases):
            copied += self._read_remote(keys[copied:], target)
        if count:
            with self._lock:
                self._count_lookup(len(keys), copied)
        return copied

    def _read_disk(self, key: BlockKey, out: Array) -> bool:
        assert self._disk is not None
        try:
            if self._disk.read_into(key, out.data):
                return True
        except (OSError, StorageError) as exc:
            # The disk tier answers misses itself; an error escaping it still must
            # not fail the get. The block stays indexed: the next read tries again.
            log.warning("disk read of a block failed: %s", exc)
            with self._lock:
                self._stats.tiers["disk"].errors += 1
            return False
        with self._lock:  # corrupt or gone: the disk tier quarantined it
            self._place.forget_disk_copy(key)
        return False

    def _finish_read(self, leases: list[Lease], copied: int, now: float) -> None:
        for position, lease in enumerate(leases):
            self._place.release(lease)
            if position < copied:
                tier = self._stats.tiers["memory" if lease.location else "disk"]
                tier.hits += 1
                tier.bytes_read += lease.entry.meta.nbytes
                self._ledger.touch(lease.key, now)

    def _promote(self, hits: list[tuple[BlockKey, Array]]) -> None:
        """Copies blocks read from disk into memory (clean: they stay on disk)."""
        if not hits:
            return
        with self._lock:
            found = [(k, a, self._index.entry(k)) for k, a in hits]
        found = [(k, a, e) for k, a, e in found if e is not None]
        self._store(
            [k for k, _, _ in found],
            [a for _, a, _ in found],
            [e.meta for _, _, e in found if e is not None],
            promote=True,
        )

    def _read_remote(self, keys: Sequence[BlockKey], target: Target) -> int:
        """Continues a prefix from the remote tiers once the local tiers run out.

        Blocks found there are put in memory and written down like any put.
        """
        found = 0
        for key in keys:
            hit = self._remote_get(key)
            if hit is None:
                break
            name, block = hit
            out = target(block.nbytes)
            np.copyto(out, block)
            meta = BlockMeta(block.nbytes)
            self._store([key], [out], [meta], promote=False)
            with self._lock:
                self._stats.tiers[name].hits += 1
                self._stats.tiers[name].bytes_read += block.nbytes
            found += 1
        return found

    def _remote_get(self, key: BlockKey) -> tuple[str, Array] | None:
        now = self._clock()
        for remote in self._remotes:
            block = remote.get(key, now)
            if block is not None:
                return remote.name, block
        return None

    def lease(
        self, keys: Sequence[BlockKey], *, seconds: float | None = None
    ) -> BlockLease:
        """Leases the leading stored blocks of ``keys`` for reading in place.

        Blocks on disk are promoted into memory first, so every leased block has a
        view into the arena: engines copy from it straight to a GPU or a socket, with
        no copy in between. The lease keeps the blocks from eviction and their slots
        from reuse for ``seconds`` (default ``store.lease_seconds``), or until
        released: a reader that dies without releasing leaks nothing. A copy that
        ends after that may have read another block's bytes: check
        :meth:`BlockLease.expired` once it is done. ``math.inf`` lasts until
        released, for a reader that releases in a ``finally`` and bounds its own time.
        """
        self._prefetch(keys)
        now = self._clock()
        if seconds is None:
            seconds = self.config.store.lease_seconds
        deadline = now + seconds
        with self._lock:
            self._check_open()
            leases = self._place.lease_prefix(keys, now, deadline)
            in_memory = next(
                (i for i, lease in enumerate(leases) if lease.location is None),
                len(leases),
            )
            for extra in leases[in_memory:]:
                self._place.release(extra)
            leases = leases[:in_memory]
        views = []
        for lease in leases:
            assert lease.location is not None
            view = self._memory.view(*lease.location).view()
            view.flags.writeable = False
            views.append(view)
        with self._lock:
            self._count_lookup(len(keys), len(leases))
        return BlockLease(
            tuple(lease.key for lease in leases),
            tuple(lease.location[0] for lease in leases if lease.location),
            views,
            deadline,
            lambda: self._release_leases(leases),
            self._clock,
        )

    def _count_lookup(self, asked: int, found: int) -> None:
        self._stats.lookups += 1
        self._stats.hit_blocks += found
        self._stats.miss_blocks += asked - found

    def _release_leases(self, leases: list[Lease]) -> None:
        with self._lock:
            for lease in leases:
                self._place.release(lease)

    # ---------------------------------------------------------- match & co

    def match(self, keys: Sequence[BlockKey], *, window: int | None = None) -> Match:
        """How many leading blocks of a prompt are stored, and where. No side effects.

        Args:
            keys: The prompt's block keys, in order.
            window: For sliding-window attention, the number of blocks the model
                attends to: the answer is then the longest prefix whose last
                ``window`` blocks are stored.
        """
        now = self._clock()
        with self._lock:
            self._check_open()
            if window is None:
                result = self._index.match_prefix(keys, now)
            else:
                result = self._index.match_window(keys, window, now)
        tiers = tuple(LOCAL_TIERS[t] for t in result.tiers)
        if window is None and self._remotes and result.num_blocks < len(keys):
            below = self._remote_prefix(keys[result.num_blocks :])
            return Match(result.num_blocks + len(below), tiers + below)
        return Match(result.num_blocks, tiers)

    def _remote_prefix(self, keys: Sequence[BlockKey]) -> tuple[str, ...]:
        """The remote tier holding each of the leading ``keys`` found below."""
        holders: list[str | None] = [None] * len(keys)
        for remote in self._remotes:
            missing = [i for i, h in enumerate(holders) if h is None]
            if not missing:
                break
            present = remote.contains([keys[i] for i in missing])
            for i, hit in zip(missing, present, strict=True):
                if hit:
                    holders[i] = remote.name
        leading = []
        for holder in holders:
            if holder is None:
                break
            leading.append(holder)
        return tuple(leading)

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """For each key, in any order, whether some tier stores it."""
        now = self._clock()
        with self._lock:
            self._check_open()
            present = self._index.match_exact(keys, now)
        for remote in self._remotes:
            missing = [k for k, p in zip(keys, present, strict=True) if not p]
            if not missing:
                break
            found = dict(zip(missing, remote.contains(missing), strict=True))
            present = [
                p or found.get(k, False) for k, p in zip(keys, present, strict=True)
            ]
        return present

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Removes blocks from every tier; returns how many were stored."""
        now = self._clock()
        with self._lock:
            self._check_open()
            removed = sum(self._place.remove(key, now) for key in keys)
        for remote in self._remotes:
            removed = max(removed, remote.delete(keys))
        return removed

    def finish(self, keys: Sequence[BlockKey]) -> None:
        """Tells the eviction policies that the prompt ``keys`` is finished.

        Call it when a conversation is over (its whole prompt), or with a prompt's
        partial last block, which the next turn will not match as it is. The default
        policy (``hit_density``) then lets the blocks no other prompt shares go first;
        the rest ignore it. A hint only: nothing is removed, and a finished block
        that is read again is treated as any other.
        """
        now = self._clock()
        with self._lock:
            self._check_open()
            self._ledger.finish(keys, now)

    def list(
        self, group: str | None = None, limit: int | None = None
    ) -> list[BlockInfo]:
        """Blocks of the local tiers, optionally of one quota group only."""
        now = self._clock()
        infos = []
        with self._lock:
            self._check_open()
            for key, entry in self._index.items():
                if self._index.get(key, now) is None:
                    continue
                if group is not None and entry.meta.group != group:
                    continue
                tiers = tuple(n for t, n in enumerate(LOCAL_TIERS) if entry.in_tier(t))
                meta = entry.meta
                infos.append(
                    BlockInfo(key, meta.nbytes, meta.group, tiers, meta.expire_at)
                )
                if limit is not None and len(infos) >= limit:
                    break
        return infos

    def prefetch(self, keys: Sequence[BlockKey]) -> concurrent.futures.Future[int]:
        """Starts promoting the leading stored blocks of ``keys`` into memory.

        Returns:
            A future of how many leading blocks are in memory once it is done.
        """
        self._check_open()
        return self._prefetcher.submit(self._prefetch, list(keys))

    def _prefetch(self, keys: Sequence[BlockKey]) -> int:
        match = self.match(keys)
        cold = [k for k, t in zip(keys, match.tiers, strict=False) if t != "memory"]
        if cold:
            self._read(cold, lambda nbytes: np.empty(nbytes, dtype=np.uint8), False)
        return self.match(keys).tiers.count("memory")

    # ---------------------------------------------------------- TTL & stats

    def expire(self, now: float | None = None) -> int:
        """Removes every block whose time has passed; returns how many."""
        now = self._clock() if now is None else now
        with self._lock:
            expired = [
                key for key in self._index.expired(now) if self._place.remove(key, now)
            ]
            self._stats.expired_blocks += len(expired)
            self._place.expire_holds(now)
            self._place.expire_reservations(now)
        return len(expired)

    def _cleanup_loop(self) -> None:
        while not self._stop.wait(self.config.store.cleanup_interval):
            self.expire()

    def stats(self) -> StoreStats:
        """A consistent snapshot of counters, usage and per-group bytes."""
        with self._lock:
            tiers = {
                name: TierStats(**vars(s)) for name, s in self._stats.tiers.items()
            }
            for tier_id, account in enumerate(self._ledger.accounts):
                tier = tiers[LOCAL_TIERS[tier_id]]
                tier.capacity_bytes = account.budget.capacity_bytes
                tier.used_bytes = account.budget.used_bytes
                tier.num_blocks = len(account.policy)
            snapshot = StoreStats(**{**vars(self._stats), "tiers": tiers})
            snapshot.dirty_blocks = len(self._place.dirty)
            snapshot.open_reservations = len(self._place.pending)
            snapshot.held_slots = self._place.held_slots
            snapshot.group_bytes = {
                LOCAL_TIERS[t]: usage for t, usage in enumerate(self._ledger.usage())
            }
            snapshot.group_blocks = {
                LOCAL_TIERS[t]: items for t, items in enumerate(self._ledger.items())
            }
        if self._disk is not None:
            disk = self._disk.stats()
            tiers["disk"].num_corrupt = disk.num_corrupt
            tiers["disk"].compactions = disk.num_compactions
        for remote in self._remotes:
            tiers[remote.name].healthy = remote.healthy
            tiers[remote.name].errors = remote.errors
        return snapshot

    # ------------------------------------------------------------ lifecycle

    def flush(self) -> None:
        """Writes every block not yet below to the lower tiers."""
        dirty = self._place.dirty
        while dirty:
            before = len(dirty)
            self._flush(list(dirty))
            if len(dirty) >= before:  # nothing could be written
                break

    def close(self) -> None:
        """Flushes, stops background work and releases the tiers. Idempotent."""
        with self._lock:
            if self._closed:
                return
        self.flush()
        with self._lock:
            self._closed = True
            self._work.notify_all()
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._prefetcher.shutdown(wait=True)
        self._memory.close()
        if self._disk is not None:
            self._disk.close()
        for remote in self._remotes:
            remote.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")
