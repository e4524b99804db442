"""The local-SSD tier: a log of segment files for the bytes, SQLite for the index.

Layout of a tier directory::

    segments/000000000001.seg   records packed back to back, append-only
    index.sqlite3               key -> segment, offset, sizes, checksum, meta (WAL)
    reserve                     preallocated: lets a delete commit on a full disk
    lock                        flock()ed while open: one DiskTier per directory

:class:`DiskTier` orders the work below and keeps the counters; the pieces are
private modules: the segment files (appending, cutting back, reading, compaction
copies) in :mod:`kvtier.tiers._segments`, the index (SQLite schema, load, transactions,
the directory lock) in :mod:`kvtier.tiers._disk_index`, and what a write may store (new
blocks that fit, none while the disk is full, the reserve) in
:mod:`kvtier.tiers._disk_space`.

Why a segment log and SQLite. Appending a batch of blocks to one file is a sequential
write with one fsync per batch; a file per block (a create, a write and an fsync each)
measured about 0.7x of a plain sequential write here, so blocks go to a log. The index
must survive restarts and crashes; SQLite is a real crash-safe embedded database, so
we need no log format of our own. It is read once on open into a dict, and reads never
touch SQLite.

Durability is ordered, per batch:

1. append the batch's records to the active segment (one ``pwritev`` for many);
2. with ``fsync=True``, ``fdatasync`` the segments written (and the directory when a
   segment was created);
3. commit the index rows of the whole batch in one SQLite transaction
   (``synchronous`` FULL with ``fsync=True``, NORMAL otherwise);
4. only then unlink what the commit made garbage.

A crash at any point loses at most the batch in flight, and a read never serves
half-written bytes: rows point only at records written before their commit, and every
read checks the header (its own check, key, sizes) and the payload checksum. A record
that fails is quarantined (its row deleted, counted in ``num_corrupt``) and is a miss.

Reclaim and compaction. A sealed segment whose blocks are all deleted is unlinked
right after the commit that emptied it. Copying live records out of a half-empty
segment costs writes, so it waits until the segment files would pass
``COMPACT_START_FRACTION`` (90%) of ``capacity_bytes`` (:mod:`kvtier.tiers._segments`
says which segment goes and why writes at most double).

Full disk. ``ENOSPC`` (or alike) while appending cuts the segment back to its last
whole record and refuses writes until space is freed or ``full_retry_s`` pass; nothing
stored is touched, and a ``reserve`` file keeps deletes able to commit
(:mod:`kvtier.tiers._disk_space`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey, key_hex
from kvtier.errors import ConfigError, LayoutError, StorageError, StoreClosedError
from kvtier.layout import get_codec
from kvtier.tiers import _disk_index as db_index
from kvtier.tiers._disk_index import CheckReport, DiskIndex, Loc
from kvtier.tiers._disk_space import (
    DiskSpace,
    Pending,
    encode_pending,
    fit,
    fresh_items,
)
from kvtier.tiers._fsio import dest_view, is_space_error, unlink_quietly
from kvtier.tiers._segments import (
    Batch,
    Moved,
    Segment,
    SegmentLog,
    clamp_segment_bytes,
)

__all__ = ["CheckReport", "DiskStats", "DiskTier"]

logger = logging.getLogger(__name__)

COMPACT_START_FRACTION = 0.9


@dataclass(frozen=True)
class DiskStats:
    """Counters of a disk tier since it was opened (sizes are current)."""

    num_blocks: int
    live_bytes: int
    used_bytes: int
    num_segments: int
    bytes_written: int  # every byte appended, compaction copies included
    bytes_read: int
    num_writes: int  # blocks newly stored by write()
    num_reads: int  # successful read_into() calls
    num_corrupt: int  # blocks quarantined
    num_write_failures: int  # write() items answered False
    num_compactions: int
    full: bool  # the filesystem said ENOSPC (or alike) and no space was freed since


@dataclass(slots=True)
class _Counters:
    bytes_written: int = 0
    bytes_read: int = 0
    num_writes: int = 0
    num_reads: int = 0
    num_corrupt: int = 0
    num_write_failures: int = 0
    num_compactions: int = 0


class DiskTier:
    """Blocks on a local SSD: segment log + SQLite index. Thread-safe.

    Args:
        path: Directory of the tier; created if missing.
        capacity_bytes: Budget for the segment files; writes past it answer ``False``.
        segment_bytes: Largest segment file; clamped to ``max(1 MiB, capacity / 16)``.
        fsync: Make every write batch durable against power loss before it returns.
        compression: ``"none"``, ``"lz4"`` or ``"zstd"``; kept only when it saves space.
        max_open_files: Read fds kept open (LRU).
        full_retry_s: After ENOSPC, seconds before writes touch the disk again.

    Raises:
        ConfigError: A bad argument.
        StorageError: The directory or its index cannot be opened (wrong schema too).
    """

    name = "disk"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        capacity_bytes: int,
        segment_bytes: int = 256 * 2**20,
        fsync: bool = False,
        compression: str = "none",
        max_open_files: int = 64,
        full_retry_s: float = 5.0,
    ) -> None:
        _validate(capacity_bytes, segment_bytes, max_open_files, full_retry_s)
        self._codec = get_codec(compression)
        self._capacity_bytes = capacity_bytes
        self._root = Path(path)
        self._space = DiskSpace(self._root, capacity_bytes, full_retry_s)
        # Lock order: _write_lock, then _lock. _write_lock serializes everything that
        # changes what is durable (appends, SQLite, unlinks); _lock guards the in-memory
        # state and is never held across payload I/O, so reads run beside a write.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._log = SegmentLog(
            self._root,
            segment_bytes=clamp_segment_bytes(segment_bytes, capacity_bytes),
            max_open_files=max_open_files,
            fsync=fsync,
            lock=self._lock,
        )
        self._closed = False
        self._counters = _Counters()
        self._open(fsync)

    def _open(self, fsync: bool) -> None:
        try:
            self._log.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create disk tier at {self._root}: {exc}"
            ) from exc
        self._index = DiskIndex(self._root, self._log, fsync=fsync)
        live = self._index.live_per_segment()
        try:
            adopted = self._log.load(live, adopt=not self._index.created)
        except (OSError, StorageError) as exc:
            self._index.close()
            raise StorageError(f"cannot load disk tier in {self._root}: {exc}") from exc
        if adopted:
            self._reclaim()  # crashed between a commit and its unlink, or mid-batch
        self._space.hold_reserve()

    # -- queries ----------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of all segment files (live records, garbage and torn tails)."""
        with self._lock:
            self._check_open()
            return self._log.used_bytes

    @property
    def live_bytes(self) -> int:
        """Record bytes (header + stored payload) of the blocks stored."""
        with self._lock:
            self._check_open()
            return self._log.live_bytes()

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._index.locs)

    def contains(self, key: BlockKey, now: float | None = None) -> bool:
        """Whether ``key`` is stored and not expired at ``now`` (default: the clock)."""
        return self.meta(key, now) is not None

    def meta(self, key: BlockKey, now: float | None = None) -> BlockMeta | None:
        """The meta ``key`` was written with; ``None`` when absent or expired."""
        now = time.time() if now is None else now
        with self._lock:
            self._check_open()
            loc = self._index.locs.get(key)
        return None if loc is None or loc.expire_at <= now else loc.meta()

    def locate(self, key: BlockKey) -> tuple[Path, int, int] | None:
        """Where a block's record lives: segment file, offset, record bytes."""
        with self._lock:
            self._check_open()
            loc = self._index.locs.get(key)
        if loc is None:
            return None
        return self._log.path_of(loc.segment_id), loc.offset, loc.record_bytes

    def entries(self) -> Iterator[tuple[BlockKey, BlockMeta]]:
        """Every block with its meta, oldest write first (a snapshot).

        Expired blocks are listed too (they are never read), so that whoever reloads
        its index from here sees them and can delete them.
        """
        with self._lock:
            self._check_open()
            locs = list(self._index.locs.values())
        return ((BlockKey(loc.key), loc.meta()) for loc in locs)

    def stats(self) -> DiskStats:
        with self._lock:
            self._check_open()
            return DiskStats(
                num_blocks=len(self._index.locs),
                live_bytes=self._log.live_bytes(),
                used_bytes=self._log.used_bytes,
                num_segments=len(self._log.segments),
                full=self._space.full,
                **asdict(self._counters),
            )

    # -- reads ------------------------------------------------------------------------

    def read_into(self, key: BlockKey, out: Any, now: float | None = None) -> bool:
        """Reads a block into ``out``, verified: a miss, expired or corrupt is False.

        Args:
            key: The block.
            out: A writable C-contiguous buffer of exactly the block's raw size. On
                ``False`` its contents are undefined.
            now: Unix time to judge expiry by (default: the clock).

        Raises:
            LayoutError: ``out`` is read-only, not contiguous or not the block's size.
        """
        dest = dest_view(out)
        now = time.time() if now is None else now
        failure = ""
        with self._lock:
            self._check_open()
            loc = self._index.locs.get(key)
            if loc is None or loc.expire_at <= now:
                return False
            if dest.nbytes != loc.raw_bytes:
                raise LayoutError(
                    f"block {key_hex(key)} is {loc.raw_bytes} bytes, "
                    f"destination holds {dest.nbytes}"
                )
            try:
                handle = self._log.acquire(loc.segment_id)
            except OSError as exc:
                failure = f"cannot open its segment: {exc.strerror}"
                handle = None
        if handle is not None:
            failure = self._log.read(handle, loc, dest)
        if failure:
            self._quarantine(loc, failure)
            return False
        with self._lock:
            self._counters.num_reads += 1
            self._counters.bytes_read += loc.record_bytes
        return True

    def _quarantine(self, loc: Loc, reason: str) -> None:
        logger.warning(
            "disk tier %s: block %s is corrupt (%s); quarantined",
            self._root,
            key_hex(loc.key),
            reason,
        )
        with self._write_lock:
            with self._lock:
                if self._closed or self._index.locs.get(loc.key) is not loc:
                    return  # closed, or deleted or moved meanwhile
            self._drop_corrupt([loc.key])

    def _drop_corrupt(self, keys: list[bytes]) -> int:
        try:
            self._commit(db_index.DELETE, [(key,) for key in keys], frees_space=True)
        except sqlite3.Error as exc:  # still never serve it from this process
            logger.error(
                "disk tier %s: cannot delete corrupt rows: %s", self._root, exc
            )
        return self._forget(keys, corrupt=True)

    # -- writes -----------------------------------------------------------------------

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        """Stores blocks in one batch; a block already stored is left as it is.

        Args:
            items: ``(key, block, meta)``; ``block`` is a numpy array, a CPU torch
                tensor or a bytes-like object of ``meta.nbytes`` bytes.

        Returns:
            Per item, whether the block is stored. ``False`` when it does not fit in
            ``capacity_bytes``, the filesystem is full, or the I/O failed (logged).

        Raises:
            KeyFormatError: A key is not 16 bytes.
            LayoutError: A block is not a buffer of ``meta.nbytes`` bytes.
        """
        results = [True] * len(items)
        with self._write_lock:
            self._check_open()
            with self._lock:
                fresh, repeats = fresh_items(items, self._index.locs, time.time())
            if not fresh:
                return results
            pending = [
                encode_pending(position, *items[position], self._codec)
                for position in fresh
            ]
            if self._space.refusing():
                admitted = self._refuse(pending, results)
            else:
                admitted = self._admit(pending, results)
            if admitted:
                self._store(admitted, results)
        for position, first in repeats.items():
            results[position] = results[first]
        return results

    def _refuse(self, pending: list[Pending], results: list[bool]) -> list[Pending]:
        for item in pending:
            results[item.position] = False
        with self._lock:
            self._counters.num_write_failures += len(pending)
        return []

    def _admit(self, pending: list[Pending], results: list[bool]) -> list[Pending]:
        """The items that fit in ``capacity_bytes``, after compacting if that helps."""
        self._compact_for(sum(item.record_bytes for item in pending))
        admitted, refused = fit(pending, self._capacity_bytes - self._log.used_bytes)
        self._refuse(refused, results)
        return admitted

    def _store(self, admitted: list[Pending], results: list[bool]) -> None:
        batch = Batch()
        sizes = [item.record_bytes for item in admitted]
        places, error = self._log.append(batch, [p.buffers for p in admitted], sizes)
        failure: Exception | None = error
        now = time.time()
        seq = self._index.next_seq
        rows = [
            db_index.insert_row(p.key, p.header, p.meta, place, seq + i, now)
            for i, (p, place) in enumerate(zip(admitted, places, strict=False))
        ]
        if rows:
            try:
                self._log.sync(batch)
                self._commit(db_index.INSERT, rows)
            except (OSError, sqlite3.Error) as exc:
                self._log.undo(batch)
                rows, failure = [], failure or exc
        self._log.end_batch(batch)
        if failure is not None:
            self._note_write_error(failure)
        with self._lock:
            self._index.add(rows)
            self._counters.num_writes += len(rows)
            self._counters.bytes_written += sum(sizes[: len(rows)])
            if rows and failure is None:
                self._space.note_written()
        self._refuse(admitted[len(rows) :], results)
        self._reclaim(frees_space=failure is None)  # an undone batch freed nothing

    def _commit(
        self, statement: str, rows: list[tuple[Any, ...]], *, frees_space: bool = False
    ) -> None:
        """Runs ``statement`` over ``rows`` in one transaction, rolled back on error.

        A commit that frees space (a delete) may spend the reserve on a full disk.
        """
        try:
            self._transaction(statement, rows)
        except sqlite3.Error as exc:
            if not (
                frees_space and is_space_error(exc) and self._space.release_reserve()
            ):
                raise
            self._transaction(statement, rows)

    def _transaction(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        self._index.run(statement, rows)

    def _note_write_error(self, exc: Exception) -> None:
        if not is_space_error(exc):
            logger.error("disk tier %s: write failed: %s", self._root, exc)
            self._log.seal_active()  # start a fresh segment after an I/O error
        else:
            self._space.note_full(exc)

    # -- deletes, reclaim, compaction -------------------------------------------------

    def delete(self, keys: Iterable[BlockKey]) -> int:
        """Removes blocks in one transaction; returns how many were stored.

        A failure of the index is logged and removes nothing (returns 0).
        """
        with self._write_lock:
            with self._lock:
                self._check_open()
                present = list({key for key in keys if key in self._index.locs})
            if not present:
                return 0
            rows = [(key,) for key in present]
            try:
                self._commit(db_index.DELETE, rows, frees_space=True)
            except sqlite3.Error as exc:
                logger.error("disk tier %s: delete failed: %s", self._root, exc)
                return 0
            return self._forget(present, corrupt=False)

    def _forget(self, keys: Sequence[bytes], *, corrupt: bool) -> int:
        """Drops committed deletions from memory, then unlinks emptied segments."""
        with self._lock:
            num_removed = self._index.remove(keys)
            if corrupt:
                self._counters.num_corrupt += num_removed
        self._reclaim()
        return num_removed

    def _reclaim(self, *, frees_space: bool = True) -> None:
        """Unlinks sealed segments without live bytes (call after the commit)."""
        with self._lock:
            dead = self._log.drop_empty()
        self._unlink(dead, frees_space=frees_space)

    def _unlink(self, paths: list[Path], *, frees_space: bool = True) -> None:
        for path in paths:
            unlink_quietly(path)
        if paths and frees_space:
            self._space.note_freed()

    def _compact_for(self, incoming_bytes: int) -> None:
        limit = COMPACT_START_FRACTION * self._capacity_bytes
        for victim in self._log.compaction_victims(incoming_bytes, limit):
            if not self._compact(victim):
                return

    def _compact(self, victim: Segment) -> bool:
        """Moves the victim's live records to the active segment; False on failure."""
        with self._lock:
            locs = self._index.in_segment(victim.segment_id)
            try:
                handle = self._log.acquire(victim.segment_id)
            except OSError as exc:
                logger.warning("disk tier %s: cannot compact: %s", self._root, exc)
                return False
        try:
            moved, bad = self._log.compact(handle.fd, locs, self._commit_moves)
        except (OSError, sqlite3.Error) as exc:
            self._note_write_error(exc)
            return False
        finally:
            with self._lock:
                self._log.release(handle)
        with self._lock:
            self._index.move(moved)
            self._counters.num_compactions += 1
            self._counters.bytes_written += sum(loc.record_bytes for loc, _ in moved)
        if bad:
            self._drop_corrupt(bad)
        self._reclaim()
        return True

    def _commit_moves(self, moved: list[Moved]) -> None:
        rows = [(sid, offset, loc.key) for loc, (sid, offset) in moved]
        self._commit(db_index.MOVE, rows)

    # -- audit, page cache, close -----------------------------------------------------

    def check(self, fix: bool = False) -> CheckReport:
        """Audits every index row against the segment files, and looks for orphans.

        Each row's record must exist with a valid header, the row's key and sizes, and
        its checksum. Segment files no row points into are orphans. Garbage after the
        last record of a segment (a torn tail) is fine. Writes wait while it runs.

        Args:
            fix: Delete the bad rows (counted as corrupt) and unlink the orphans.

        Raises:
            StorageError: The index or the segment directory cannot be read or, with
                ``fix``, the index cannot be changed.
        """
        with self._write_lock:
            self._check_open()
            try:
                locs = self._index.by_position()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read index of {self._root}: {exc}") from exc
            bad, orphans = self._log.audit(locs)
            report = CheckReport.of(len(locs), bad, orphans)
            if not fix:
                return report
            return self._fix(report, [key for key, _ in bad], orphans)

    def _fix(
        self, report: CheckReport, bad_keys: list[bytes], orphans: list[Path]
    ) -> CheckReport:
        if bad_keys:
            rows = [(key,) for key in bad_keys]
            try:
                self._commit(db_index.DELETE, rows, frees_space=True)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot fix index of {self._root}: {exc}") from exc
            self._forget(bad_keys, corrupt=True)
        with self._lock:
            self._log.drop_files(orphans)
        self._unlink(orphans)
        return replace(
            report, num_rows_removed=len(bad_keys), num_segments_removed=len(orphans)
        )

    def drop_page_cache(self) -> None:
        """Flushes the segment files and asks the kernel to drop them from its cache.

        Raises:
            StorageError: A segment file could not be flushed.
        """
        with self._lock:
            self._check_open()
        self._log.drop_page_cache()

    def close(self) -> None:
        """Closes files and the index; idempotent. Then calls raise StoreClosedError."""
        with self._write_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                self._log.close_reads()
            garbage = self._log.close_writes()  # an active segment with nothing live
            if garbage is not None:
                self._unlink([garbage])
            self._index.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"disk tier {self._root} is closed")


def _validate(
    capacity_bytes: int, segment_bytes: int, max_open_files: int, full_retry_s: float
) -> None:
    for arg, value in (
        ("capacity_bytes", capacity_bytes),
        ("segment_bytes", segment_bytes),
        ("max_open_files", max_open_files),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"disk.{arg} must be a positive int, got {value!r}")
    if not full_retry_s >= 0:
        raise ConfigError(f"disk.full_retry_s must be >= 0, got {full_retry_s!r}")
