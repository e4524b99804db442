"""The local-SSD tier: a log of segment files for the bytes, SQLite for the index.

Layout of a tier directory::

    segments/000000000001.seg   records packed back to back, append-only
    segments/000000000002.seg   ...
    index.sqlite3               key -> segment, offset, sizes, checksum, meta (WAL)
    reserve                     preallocated: lets a delete commit on a full disk
    lock                        flock()ed while open: one DiskTier per directory

A record is a 64-byte :class:`~kvtier.tiers._record.RecordHeader` and the stored
payload (see ``_record.encode``), with no alignment. One segment is active at a time;
it is sealed when the next record would take it past ``segment_bytes``. After a
restart the tier never appends to an old segment, whose tail a crash may have torn: it
starts the next id.

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

Reclaim and compaction. Deleting a block turns its record into garbage; live bytes are
tracked per segment. A sealed segment with no live bytes is unlinked right after the
commit that emptied it, which costs nothing. Copying live records out of a half-empty
segment costs writes, so it waits until space is needed: when the segment files would
pass ``COMPACT_START_FRACTION`` (90%) of ``capacity_bytes``, the sealed segment with the
lowest live ratio is compacted, if that ratio is under ``COMPACT_MAX_LIVE_RATIO`` (0.5).
Its live records are appended to the active segment, their rows moved in one
transaction, then the old file unlinked. Each byte copied frees more than one byte, so
compaction at most doubles the bytes written (write amplification < 2), and far less
in practice since the emptiest segment goes first. While compacting, usage may pass the
capacity by the live bytes being copied, under half a segment.

Full disk. ``ENOSPC``, ``EDQUOT`` or ``EFBIG`` while appending cuts the segment back to
its last whole record, and the tier turns *full*: writes answer ``False`` without
touching the disk until a segment file is unlinked (a delete or a compaction freed real
space) or ``full_retry_s`` seconds pass. Nothing already stored is touched. Deleting
needs SQLite to append to its WAL, so the tier keeps a small preallocated ``reserve``
file (``capacity / 256``, 64 KiB to 1 MiB) and gives it up when a delete's commit finds
the disk full; it is taken again once space comes back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import itertools
import logging
import math
import operator
import os
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np

from kvtier.core.index import BlockMeta
from kvtier.core.keys import KEY_BYTES, BlockKey, key_hex
from kvtier.errors import (
    ConfigError,
    CorruptBlockError,
    KeyFormatError,
    LayoutError,
    StorageError,
    StoreClosedError,
)
from kvtier.layout import as_block_array, checksum, get_codec
from kvtier.tiers._record import HEADER_BYTES, RecordHeader, decode_into, encode

__all__ = ["CheckReport", "DiskStats", "DiskTier"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
MIN_SEGMENT_BYTES = 2**20
SEGMENTS_PER_CAPACITY = 16  # segment_bytes is clamped to capacity / 16 (>= 1 MiB)
COMPACT_START_FRACTION = 0.9
COMPACT_MAX_LIVE_RATIO = 0.5
COMPACT_CHUNK_BYTES = 32 * 2**20  # live records read per step of a compaction
# A preallocated file released only to let a delete commit on a full disk: SQLite must
# append to its WAL to delete rows, and deleting is how space comes back.
RESERVE_MIN_BYTES = 64 * 1024
RESERVE_MAX_BYTES = 2**20

_IOV_MAX = 1024  # Linux's limit on buffers per pwritev
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_SQLITE_FULL = 13
_SEGMENT_NAME = re.compile(r"^(\d{12})\.seg$")
_COLUMNS = (
    "key, segment, offset, stored_bytes, raw_bytes, codec, checksum, grp, parent, "
    "expire_at, seq"
)
_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE blocks (key BLOB PRIMARY KEY, segment INTEGER NOT NULL, "
    "offset INTEGER NOT NULL, stored_bytes INTEGER NOT NULL, "
    "raw_bytes INTEGER NOT NULL, codec INTEGER NOT NULL, checksum INTEGER NOT NULL, "
    "grp TEXT NOT NULL, parent BLOB, "
    "expire_at REAL NOT NULL, seq INTEGER NOT NULL, written_at REAL NOT NULL) "
    "WITHOUT ROWID",
)
_INSERT = (
    f"INSERT OR REPLACE INTO blocks ({_COLUMNS}, written_at) VALUES ({'?,' * 11}?)"
)
_MOVE = "UPDATE blocks SET segment = ?, offset = ? WHERE key = ?"
_DELETE = "DELETE FROM blocks WHERE key = ?"


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


@dataclass(frozen=True)
class CheckReport:
    """What :meth:`DiskTier.check` found (and, with ``fix=True``, removed).

    Attributes:
        num_checked: Index rows audited.
        bad_blocks: ``(key hex, reason)`` of each row whose record is missing or wrong.
        orphan_segments: Segment file names no index row points into.
        num_rows_removed: Bad rows deleted (``fix=True`` only).
        num_segments_removed: Orphan segment files unlinked (``fix=True`` only).
    """

    num_checked: int
    bad_blocks: tuple[tuple[str, str], ...]
    orphan_segments: tuple[str, ...]
    num_rows_removed: int = 0
    num_segments_removed: int = 0

    @property
    def ok(self) -> bool:
        """Nothing found: no bad block and no orphan segment.

        Orphans count: crash leftovers are reclaimed on open, so an orphan means
        something outside the tier wrote there or the index was replaced.
        """
        return not self.bad_blocks and not self.orphan_segments


class _Loc(NamedTuple):
    """Where a block's record lies, and its meta: one index row (same column order).

    Never mutated: a move makes a new one, so ``index[key] is loc`` tells a reader that
    nothing happened to the block since it looked.
    """

    key: bytes
    segment_id: int
    offset: int
    stored_bytes: int
    raw_bytes: int
    codec_id: int
    checksum: int  # signed 64-bit, as SQLite stores integers
    group: str
    parent: bytes | None
    expire_at: float
    seq: int

    @property
    def record_bytes(self) -> int:
        return HEADER_BYTES + self.stored_bytes

    def meta(self) -> BlockMeta:
        parent = None if self.parent is None else BlockKey(self.parent)
        return BlockMeta(self.raw_bytes, self.group, parent, self.expire_at)


class _Pending(NamedTuple):
    """A block of a write batch, encoded, not yet placed."""

    position: int  # in the batch
    key: BlockKey
    meta: BlockMeta
    header: RecordHeader
    buffers: list[Any]  # packed header, stored payload
    record_bytes: int


@dataclass(slots=True)
class _Segment:
    segment_id: int
    path: Path
    size: int = 0  # bytes in the file
    live_bytes: int = 0  # record bytes of blocks the index points at
    sealed: bool = False


@dataclass(slots=True)
class _OpenFile:
    """A read fd shared by readers; closed when evicted or unlinked and unused."""

    fd: int
    refs: int = 0
    retired: bool = False


@dataclass(slots=True)
class _Batch:
    """The segments one batch appended to, for fsync, undo and closing their fds.

    ``touched`` holds ``(segment, its write fd, its size before the batch)``.
    """

    touched: list[tuple[_Segment, int, int]] = field(default_factory=list)
    created_files: bool = False


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
        for arg, value in (
            ("capacity_bytes", capacity_bytes),
            ("segment_bytes", segment_bytes),
            ("max_open_files", max_open_files),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"disk.{arg} must be a positive int, got {value!r}")
        if not full_retry_s >= 0:
            raise ConfigError(f"disk.full_retry_s must be >= 0, got {full_retry_s!r}")
        self._codec = get_codec(compression)
        self._capacity_bytes = capacity_bytes
        self._segment_bytes = min(
            segment_bytes,
            max(MIN_SEGMENT_BYTES, capacity_bytes // SEGMENTS_PER_CAPACITY),
        )
        self._fsync = fsync
        self._max_open_files = max_open_files
        self._full_retry_s = full_retry_s
        self._root = Path(path)
        self._segment_dir = self._root / "segments"
        self._reserve_path = self._root / "reserve"
        self._reserve_bytes = min(
            RESERVE_MAX_BYTES, max(RESERVE_MIN_BYTES, capacity_bytes // 256)
        )
        self._reserve_held = False
        # Lock order: _write_lock, then _lock. _write_lock serializes everything that
        # changes what is durable (appends, SQLite, unlinks); _lock guards the in-memory
        # state and is never held across payload I/O, so reads run beside a write.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        self._index: dict[bytes, _Loc] = {}
        self._segments: dict[int, _Segment] = {}
        self._used_bytes = 0
        self._open_files: OrderedDict[int, _OpenFile] = OrderedDict()
        self._active: _Segment | None = None
        self._active_fd = -1
        self._next_segment_id = 1
        self._next_seq = 1
        self._full_since: float | None = None  # time.monotonic() of the last ENOSPC
        self._counters = _Counters()
        try:
            self._segment_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create disk tier at {self._root}: {exc}"
            ) from exc
        self._dir_lock_fd = _lock_directory(self._root)
        try:
            self._db, created = self._open_index()
        except StorageError:
            os.close(self._dir_lock_fd)
            raise
        try:
            self._load(reclaim_orphans=not created)
        except (sqlite3.Error, OSError) as exc:
            self._db.close()
            os.close(self._dir_lock_fd)
            raise StorageError(
                f"cannot load disk tier index in {self._root}: {exc}"
            ) from exc
        self._hold_reserve()

    # -- opening ----------------------------------------------------------------------

    def _open_index(self) -> tuple[sqlite3.Connection, bool]:
        db_path = self._root / "index.sqlite3"
        try:
            db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open disk tier index {db_path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
            db.execute("BEGIN IMMEDIATE")
            tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            created = not tables.fetchall()
            if created:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
            row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'")
            version = row.fetchone()
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            db.close()
            raise StorageError(f"cannot read disk tier index {db_path}: {exc}") from exc
        if version is None or version[0] != SCHEMA_VERSION:
            db.close()
            found = None if version is None else version[0]
            raise StorageError(
                f"disk tier index {db_path} has schema version {found!r}, "
                f"this kvtier reads {SCHEMA_VERSION!r}"
            )
        return db, created

    def _load(self, *, reclaim_orphans: bool) -> None:
        # Sorting in Python is twice as fast as ORDER BY over a column without an index,
        # and pausing the cyclic GC while 100k tuples are made saves another third.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM blocks").fetchall()
            rows.sort(key=operator.itemgetter(10))  # seq: write order
            new = tuple.__new__
            self._index = {row[0]: new(_Loc, row) for row in rows}
        finally:
            if gc_was_enabled:
                gc.enable()
        live: dict[int, int] = {}
        for row in rows:  # HEADER_BYTES + stored_bytes per segment
            live[row[1]] = live.get(row[1], 0) + HEADER_BYTES + row[3]
        self._next_seq = rows[-1][10] + 1 if rows else 1
        files = self._segment_files()
        self._next_segment_id = max([sid for sid, _ in files] + [*live], default=0) + 1
        if files and not reclaim_orphans:  # adopting them would unlink them
            logger.warning(
                "disk tier %s: new index beside %d segment files; check(fix=True) "
                "removes them",
                self._root,
                len(files),
            )
            return
        for segment_id, path in files:
            seg = _Segment(segment_id, path, path.stat().st_size, sealed=True)
            self._segments[segment_id] = seg
        missing = sorted(set(live) - set(self._segments))
        if missing:
            logger.warning(
                "disk tier %s: segment files %s are missing", self._root, missing
            )
        for segment_id in missing:
            path = self._segment_path(segment_id)
            self._segments[segment_id] = _Segment(segment_id, path, sealed=True)
        for segment_id, nbytes in live.items():
            self._segments[segment_id].live_bytes = nbytes
        self._used_bytes = sum(seg.size for seg in self._segments.values())
        self._reclaim()  # crashed between a commit and its unlink, or mid-batch

    def _segment_files(self) -> list[tuple[int, Path]]:
        found = []
        for entry in os.scandir(self._segment_dir):
            match = _SEGMENT_NAME.match(entry.name)
            if match and entry.is_file():
                found.append((int(match[1]), Path(entry.path)))
        return sorted(found)

    def _segment_path(self, segment_id: int) -> Path:
        return self._segment_dir / f"{segment_id:012d}.seg"

    # -- queries ----------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of all segment files (live records, garbage and torn tails)."""
        with self._lock:
            self._check_open()
            return self._used_bytes

    @property
    def live_bytes(self) -> int:
        """Record bytes (header + stored payload) of the blocks stored."""
        with self._lock:
            self._check_open()
            return sum(seg.live_bytes for seg in self._segments.values())

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._index)

    def contains(self, key: BlockKey, now: float | None = None) -> bool:
        """Whether ``key`` is stored and not expired at ``now`` (default: the clock)."""
        return self.meta(key, now) is not None

    def meta(self, key: BlockKey, now: float | None = None) -> BlockMeta | None:
        """The meta ``key`` was written with; ``None`` when absent or expired."""
        now = time.time() if now is None else now
        with self._lock:
            self._check_open()
            loc = self._index.get(key)
        return None if loc is None or loc.expire_at <= now else loc.meta()

    def entries(self) -> Iterator[tuple[BlockKey, BlockMeta]]:
        """Every block with its meta, oldest write first (a snapshot).

        Expired blocks are listed too (they are never read), so that whoever reloads
        its index from here sees them and can delete them.
        """
        with self._lock:
            self._check_open()
            locs = list(self._index.values())
        return ((BlockKey(loc.key), loc.meta()) for loc in locs)

    def stats(self) -> DiskStats:
        with self._lock:
            self._check_open()
            return DiskStats(
                num_blocks=len(self._index),
                live_bytes=sum(seg.live_bytes for seg in self._segments.values()),
                used_bytes=self._used_bytes,
                num_segments=len(self._segments),
                full=self._full_since is not None,
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
            LayoutError: ``out`` is read-only or not the block's size.
        """
        dest = memoryview(out).cast("B")
        if dest.readonly:
            raise LayoutError("read_into needs a writable destination buffer")
        now = time.time() if now is None else now
        failure = ""
        with self._lock:
            self._check_open()
            loc = self._index.get(key)
            if loc is None or loc.expire_at <= now:
                return False
            if dest.nbytes != loc.raw_bytes:
                raise LayoutError(
                    f"block {key_hex(key)} is {loc.raw_bytes} bytes, "
                    f"destination holds {dest.nbytes}"
                )
            try:
                handle = self._acquire(loc.segment_id)
            except OSError as exc:
                failure = f"cannot open its segment: {exc.strerror}"
                handle = None
        ok = False
        if handle is not None:
            try:
                _read_block(handle.fd, loc, dest)
                ok = True
            except (CorruptBlockError, OSError) as exc:
                failure = str(exc)
            finally:
                with self._lock:
                    self._release(handle)
                    if ok:
                        self._counters.num_reads += 1
                        self._counters.bytes_read += loc.record_bytes
        if not ok:
            self._quarantine(loc, failure)
        return ok

    def _acquire(self, segment_id: int) -> _OpenFile:
        handle = self._open_files.get(segment_id)
        if handle is None:
            path = self._segment_path(segment_id)
            handle = _OpenFile(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            self._open_files[segment_id] = handle
            while len(self._open_files) > self._max_open_files:
                _, evicted = self._open_files.popitem(last=False)
                self._retire(evicted)
        else:
            self._open_files.move_to_end(segment_id)
        handle.refs += 1
        return handle

    def _release(self, handle: _OpenFile) -> None:
        handle.refs -= 1
        if handle.retired and handle.refs == 0:
            os.close(handle.fd)

    def _retire(self, handle: _OpenFile) -> None:
        handle.retired = True
        if handle.refs == 0:
            os.close(handle.fd)

    def _quarantine(self, loc: _Loc, reason: str) -> None:
        logger.warning(
            "disk tier %s: block %s is corrupt (%s); quarantined",
            self._root,
            key_hex(loc.key),
            reason,
        )
        with self._write_lock:
            with self._lock:
                if self._closed or self._index.get(loc.key) is not loc:
                    return  # closed, or deleted or moved meanwhile
            self._drop_corrupt([loc.key])

    def _drop_corrupt(self, keys: list[bytes]) -> int:
        try:
            self._commit(_DELETE, [(key,) for key in keys], frees_space=True)
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
            fresh, repeats = self._fresh_items(items)
            if not fresh:
                return results
            pending = [self._encode(position, *items[position]) for position in fresh]
            if self._refusing_writes():
                admitted = self._refuse(pending, results)
            else:
                admitted = self._admit(pending, results)
            if admitted:
                self._store(admitted, results)
        for position, first in repeats.items():
            results[position] = results[first]
        return results

    def _fresh_items(
        self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]
    ) -> tuple[list[int], dict[int, int]]:
        """Positions of the items to store, and of repeated keys -> their first."""
        now = time.time()
        fresh: list[int] = []
        first_seen: dict[bytes, int] = {}
        repeats: dict[int, int] = {}
        with self._lock:
            for position, (key, _, _) in enumerate(items):
                if len(key) != KEY_BYTES:
                    raise KeyFormatError(
                        f"a block key is {KEY_BYTES} bytes, got {key!r}"
                    )
                if key in first_seen:
                    repeats[position] = first_seen[key]
                    continue
                first_seen[key] = position
                loc = self._index.get(key)
                if loc is None or loc.expire_at <= now:
                    fresh.append(position)
        return fresh, repeats

    def _encode(
        self, position: int, key: BlockKey, block: Any, meta: BlockMeta
    ) -> _Pending:
        arr = as_block_array(block)
        payload = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
        if payload.nbytes != meta.nbytes:
            raise LayoutError(
                f"block {key_hex(key)} has {payload.nbytes} bytes, meta.nbytes says "
                f"{meta.nbytes}"
            )
        expire_at = meta.expire_at if math.isfinite(meta.expire_at) else 0.0
        header, stored = encode(key, payload, self._codec, expire_at)
        record_bytes = HEADER_BYTES + header.stored_bytes
        return _Pending(
            position, key, meta, header, [header.pack(), stored], record_bytes
        )

    def _refusing_writes(self) -> bool:
        since = self._full_since
        return since is not None and time.monotonic() - since < self._full_retry_s

    def _refuse(self, pending: list[_Pending], results: list[bool]) -> list[_Pending]:
        for item in pending:
            results[item.position] = False
        with self._lock:
            self._counters.num_write_failures += len(pending)
        return []

    def _admit(self, pending: list[_Pending], results: list[bool]) -> list[_Pending]:
        """The items that fit in ``capacity_bytes``, after compacting if that helps."""
        self._compact_for(sum(item.record_bytes for item in pending))
        free_bytes = self._capacity_bytes - self._used_bytes
        admitted, refused = [], []
        for item in pending:
            if item.record_bytes <= free_bytes:
                admitted.append(item)
                free_bytes -= item.record_bytes
            else:
                refused.append(item)
        self._refuse(refused, results)
        return admitted

    def _store(self, admitted: list[_Pending], results: list[bool]) -> None:
        batch = _Batch()
        sizes = [item.record_bytes for item in admitted]
        placements, error = self._append(batch, [p.buffers for p in admitted], sizes)
        failure: Exception | None = error
        now = time.time()
        rows = [
            _row(item, segment_id, offset, self._next_seq + i, now)
            for i, (item, (segment_id, offset)) in enumerate(
                zip(admitted, placements, strict=False)
            )
        ]
        if rows:
            try:
                self._sync(batch)
                self._commit(_INSERT, rows)
            except (OSError, sqlite3.Error) as exc:
                self._undo(batch)
                rows, failure = [], failure or exc
        self._end_batch(batch)
        if failure is not None:
            self._note_write_error(failure)
        with self._lock:
            for row in rows:
                self._insert(_Loc._make(row[:11]))
            self._next_seq += len(rows)
            self._counters.num_writes += len(rows)
            self._counters.bytes_written += sum(sizes[: len(rows)])
            if rows and failure is None:
                self._full_since = None
        self._refuse(admitted[len(rows) :], results)
        self._reclaim(frees_space=failure is None)  # an undone batch freed nothing

    def _insert(self, loc: _Loc) -> None:
        old = self._index.pop(loc.key, None)  # an expired block written again
        if old is not None:
            self._segments[old.segment_id].live_bytes -= old.record_bytes
        self._index[loc.key] = loc
        self._segments[loc.segment_id].live_bytes += loc.record_bytes

    def _append(
        self, batch: _Batch, records: list[list[Any]], sizes: list[int]
    ) -> tuple[list[tuple[int, int]], OSError | None]:
        """Appends records (each a list of buffers); where the whole ones landed.

        On an error the segment is cut back to its last whole record and the records
        placed so far are returned with the error.
        """
        placements: list[tuple[int, int]] = []
        i = 0
        while i < len(records):
            try:
                seg, fd = self._writable_segment(batch, sizes[i])
            except OSError as exc:
                return placements, exc
            start, end, j = seg.size, seg.size, i
            buffers: list[Any] = []
            while j < len(records) and len(buffers) + len(records[j]) <= _IOV_MAX:
                if j > i and end + sizes[j] > self._segment_bytes:
                    break
                buffers += records[j]
                end += sizes[j]
                j += 1
            written, error = _pwrite_all(fd, buffers, start)
            good = start
            for k in range(i, j):
                if good + sizes[k] > start + written:
                    break
                placements.append((seg.segment_id, good))
                good += sizes[k]
            self._cut(batch, seg, fd, good, start + written)
            if error is not None:
                return placements, error
            i = j
        return placements, None

    def _writable_segment(
        self, batch: _Batch, record_bytes: int
    ) -> tuple[_Segment, int]:
        seg = self._active
        if seg is None or (seg.size and seg.size + record_bytes > self._segment_bytes):
            self._seal_active(batch)
            segment_id = self._next_segment_id
            self._next_segment_id += 1
            path = self._segment_path(segment_id)
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
            seg = _Segment(segment_id, path)
            batch.created_files = True
            with self._lock:
                self._segments[segment_id] = seg
            self._active, self._active_fd = seg, fd
        if not any(touched is seg for touched, _, _ in batch.touched):
            batch.touched.append((seg, self._active_fd, seg.size))
        return seg, self._active_fd

    def _seal_active(self, batch: _Batch | None) -> None:
        """Stops appending to the active segment.

        Its write fd is closed now, or by ``_end_batch`` when ``batch`` still needs it
        (for fsync or undo).
        """
        seg, fd = self._active, self._active_fd
        if seg is None:
            return
        with self._lock:
            seg.sealed = True
        self._active, self._active_fd = None, -1
        if batch is None or not any(touched is seg for touched, _, _ in batch.touched):
            self._close_fd(fd)

    def _cut(
        self, batch: _Batch, seg: _Segment, fd: int, good: int, physical: int
    ) -> None:
        """Cuts a segment back to ``good`` bytes (it keeps ``physical`` on failure)."""
        if physical > good:
            try:
                os.ftruncate(fd, good)
            except OSError as exc:
                logger.warning(
                    "disk tier %s: cannot truncate %s: %s", self._root, seg.path, exc
                )
                good = physical
                if seg is self._active:
                    self._seal_active(batch)
        with self._lock:
            self._used_bytes += good - seg.size
            seg.size = good

    def _sync(self, batch: _Batch) -> None:
        if not self._fsync:
            return
        for _, fd, _ in batch.touched:
            os.fdatasync(fd)
        if batch.created_files:
            dir_fd = os.open(self._segment_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _undo(self, batch: _Batch) -> None:
        """Cuts every segment the batch touched back to its size before the batch."""
        for seg, fd, before in batch.touched:
            self._cut(batch, seg, fd, before, seg.size)

    def _end_batch(self, batch: _Batch) -> None:
        for seg, fd, _ in batch.touched:
            if seg is not self._active:
                self._close_fd(fd)

    def _close_fd(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError as exc:  # the data was synced (or not promised) already
            logger.warning("disk tier %s: closing a segment: %s", self._root, exc)

    def _commit(
        self, statement: str, rows: list[tuple[Any, ...]], *, frees_space: bool = False
    ) -> None:
        """Runs ``statement`` over ``rows`` in one transaction, rolled back on error.

        A commit that frees space (a delete) may spend the reserve on a full disk.
        """
        try:
            self._transaction(statement, rows)
        except sqlite3.Error as exc:
            if not (frees_space and _is_space_error(exc) and self._drop_reserve()):
                raise
            self._transaction(statement, rows)

    def _transaction(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(statement, rows)
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _hold_reserve(self) -> None:
        if self._reserve_held:
            return
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
        except OSError as exc:
            logger.debug("disk tier %s: no space reserve: %s", self._root, exc)
            return
        try:
            os.posix_fallocate(fd, 0, self._reserve_bytes)
            self._reserve_held = True
        except OSError as exc:
            logger.debug("disk tier %s: no space reserve yet: %s", self._root, exc)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # give back what a failed fallocate took
        finally:
            os.close(fd)

    def _drop_reserve(self) -> bool:
        if not self._reserve_held:
            return False
        logger.warning("disk tier %s: disk full, spending the reserve", self._root)
        self._reserve_held = False
        try:
            os.truncate(self._reserve_path, 0)
        except OSError as exc:
            logger.warning("disk tier %s: cannot free reserve: %s", self._root, exc)
            return False
        return True

    def _note_write_error(self, exc: Exception) -> None:
        if not _is_space_error(exc):
            logger.error("disk tier %s: write failed: %s", self._root, exc)
            self._seal_active(None)  # start a fresh segment after an I/O error
            return
        with self._lock:
            was_full = self._full_since is not None
            self._full_since = time.monotonic()
        if not was_full:
            logger.warning(
                "disk tier %s is full (%s); refusing writes until space is freed or "
                "%.0f s pass",
                self._root,
                exc,
                self._full_retry_s,
            )

    # -- deletes, reclaim, compaction -------------------------------------------------

    def delete(self, keys: Iterable[BlockKey]) -> int:
        """Removes blocks in one transaction; returns how many were stored.

        A failure of the index is logged and removes nothing (returns 0).
        """
        with self._write_lock:
            with self._lock:
                self._check_open()
                present = list({key for key in keys if key in self._index})
            if not present:
                return 0
            try:
                self._commit(_DELETE, [(key,) for key in present], frees_space=True)
            except sqlite3.Error as exc:
                logger.error("disk tier %s: delete failed: %s", self._root, exc)
                return 0
            return self._forget(present, corrupt=False)

    def _forget(self, keys: Sequence[bytes], *, corrupt: bool) -> int:
        """Drops committed deletions from memory, then unlinks emptied segments."""
        num_removed = 0
        with self._lock:
            for key in keys:
                loc = self._index.pop(key, None)
                if loc is not None:
                    num_removed += 1
                    self._segments[loc.segment_id].live_bytes -= loc.record_bytes
            if corrupt:
                self._counters.num_corrupt += num_removed
        self._reclaim()
        return num_removed

    def _reclaim(self, *, frees_space: bool = True) -> None:
        """Unlinks sealed segments without live bytes (call after the commit)."""
        with self._lock:
            dead = [
                self._drop_segment(seg)
                for seg in list(self._segments.values())
                if seg.sealed and seg.live_bytes == 0
            ]
        self._unlink(dead, frees_space=frees_space)

    def _drop_segment(self, seg: _Segment) -> Path:
        del self._segments[seg.segment_id]
        self._used_bytes -= seg.size
        handle = self._open_files.pop(seg.segment_id, None)
        if handle is not None:
            self._retire(handle)  # a reader still on it keeps reading the unlinked file
        return seg.path

    def _unlink(self, paths: list[Path], *, frees_space: bool = True) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning(
                    "disk tier %s: cannot unlink %s: %s", self._root, path, exc
                )
        if paths and frees_space:
            with self._lock:
                self._full_since = None  # real space came back
            self._hold_reserve()

    def _compact_for(self, incoming_bytes: int) -> None:
        limit = COMPACT_START_FRACTION * self._capacity_bytes
        while self._used_bytes + incoming_bytes > limit:
            used_before = self._used_bytes
            victim = self._compaction_victim()
            if victim is None or not self._compact(victim):
                return
            if self._used_bytes >= used_before:  # never loop without progress
                return

    def _compaction_victim(self) -> _Segment | None:
        with self._lock:
            sealed = [s for s in self._segments.values() if s.sealed and s.size]
        victim = min(sealed, key=lambda s: s.live_bytes / s.size, default=None)
        if victim is None or victim.live_bytes / victim.size >= COMPACT_MAX_LIVE_RATIO:
            return None
        return victim

    def _compact(self, victim: _Segment) -> bool:
        """Moves the victim's live records to the active segment; False on failure."""
        with self._lock:
            locs = [
                loc
                for loc in self._index.values()
                if loc.segment_id == victim.segment_id
            ]
            try:
                handle = self._acquire(victim.segment_id)
            except OSError as exc:
                logger.warning("disk tier %s: cannot compact: %s", self._root, exc)
                return False
        locs.sort(key=lambda loc: loc.offset)
        batch = _Batch()
        moved: list[tuple[_Loc, tuple[int, int]]] = []
        bad: list[bytes] = []
        try:
            for chunk in _chunks(locs, COMPACT_CHUNK_BYTES):
                good = []
                for loc in chunk:
                    try:
                        good.append((loc, _read_record(handle.fd, loc)))
                    except (CorruptBlockError, OSError):
                        bad.append(loc.key)
                records = [[record] for _, record in good]
                sizes = [loc.record_bytes for loc, _ in good]
                placements, error = self._append(batch, records, sizes)
                moved += zip([loc for loc, _ in good], placements, strict=False)
                if error is not None:
                    raise error
            self._sync(batch)
            self._commit(_MOVE, [(sid, off, loc.key) for loc, (sid, off) in moved])
        except (OSError, sqlite3.Error) as exc:
            self._undo(batch)
            self._end_batch(batch)
            self._note_write_error(exc)
            return False
        finally:
            with self._lock:
                self._release(handle)
        self._end_batch(batch)
        with self._lock:
            for loc, (segment_id, offset) in moved:  # in place: keeps the write order
                self._index[loc.key] = loc._replace(
                    segment_id=segment_id, offset=offset
                )
                self._segments[loc.segment_id].live_bytes -= loc.record_bytes
                self._segments[segment_id].live_bytes += loc.record_bytes
            self._counters.num_compactions += 1
            self._counters.bytes_written += sum(loc.record_bytes for loc, _ in moved)
        if bad:
            self._drop_corrupt(bad)
        self._reclaim()
        return True

    # -- audit, page cache, close -----------------------------------------------------

    def check(self, fix: bool = False) -> CheckReport:
        """Audits every index row against the segment files, and looks for orphans.

        Each row's record must exist with a valid header, the row's key and sizes, and
        its checksum. Segment files no row points into are orphans. Garbage after the
        last record of a segment (a torn tail) is fine. Writes wait while it runs.

        Args:
            fix: Delete the bad rows (counted as corrupt) and unlink the orphans.

        Raises:
            StorageError: The index cannot be read or, with ``fix``, changed.
        """
        with self._write_lock:
            self._check_open()
            try:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM blocks ORDER BY segment, offset"
                ).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read index of {self._root}: {exc}") from exc
            locs = [_Loc._make(row) for row in rows]
            bad: list[tuple[bytes, str]] = []
            for segment_id, group in itertools.groupby(
                locs, key=lambda loc: loc.segment_id
            ):
                bad += self._audit_segment(segment_id, list(group))
            referenced = {loc.segment_id for loc in locs}
            if self._active is not None:
                referenced.add(self._active.segment_id)
            try:
                files = self._segment_files()
            except OSError as exc:
                raise StorageError(
                    f"cannot list segments of {self._root}: {exc}"
                ) from exc
            orphans = [path for sid, path in files if sid not in referenced]
            report = CheckReport(
                len(locs),
                tuple((key_hex(key), reason) for key, reason in bad),
                tuple(path.name for path in orphans),
            )
            if not fix:
                return report
            return self._fix(report, [key for key, _ in bad], orphans)

    def _audit_segment(
        self, segment_id: int, locs: list[_Loc]
    ) -> list[tuple[bytes, str]]:
        try:
            fd = os.open(self._segment_path(segment_id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return [(loc.key, f"segment {segment_id}: {exc.strerror}") for loc in locs]
        bad = []
        try:
            for loc in locs:
                try:
                    _read_record(fd, loc)
                except (CorruptBlockError, OSError) as exc:
                    bad.append((loc.key, str(exc)))
        finally:
            os.close(fd)
        return bad

    def _fix(
        self, report: CheckReport, bad_keys: list[bytes], orphans: list[Path]
    ) -> CheckReport:
        if bad_keys:
            try:
                self._commit(_DELETE, [(key,) for key in bad_keys], frees_space=True)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot fix index of {self._root}: {exc}") from exc
            self._forget(bad_keys, corrupt=True)
        with self._lock:
            for path in orphans:
                seg = self._segments.get(int(path.stem))
                if seg is not None and seg is not self._active:
                    self._drop_segment(seg)
        self._unlink(orphans)
        return CheckReport(
            report.num_checked,
            report.bad_blocks,
            report.orphan_segments,
            num_rows_removed=len(bad_keys),
            num_segments_removed=len(orphans),
        )

    def drop_page_cache(self) -> None:
        """Flushes the segment files and asks the kernel to drop them from its cache.

        Raises:
            StorageError: A segment file could not be flushed.
        """
        with self._lock:
            self._check_open()
            paths = [seg.path for seg in self._segments.values()]
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # reclaimed meanwhile
            except OSError as exc:
                raise StorageError(f"cannot open {path}: {exc}") from exc
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError as exc:
                raise StorageError(f"cannot flush {path}: {exc}") from exc
            finally:
                os.close(fd)

    def close(self) -> None:
        """Closes files and the index; idempotent. Then calls raise StoreClosedError."""
        with self._write_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                for handle in self._open_files.values():
                    self._retire(handle)  # in-flight reads close theirs when done
                self._open_files.clear()
            active = self._active
            if active is not None:
                self._seal_active(None)
                if active.live_bytes == 0:  # nothing committed in it: all garbage
                    self._unlink([active.path])
            self._db.close()
            os.close(self._dir_lock_fd)

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"disk tier {self._root} is closed")


def _row(
    item: _Pending, segment_id: int, offset: int, seq: int, now: float
) -> tuple[Any, ...]:
    header, meta = item.header, item.meta
    return (
        bytes(item.key),
        segment_id,
        offset,
        header.stored_bytes,
        header.raw_bytes,
        header.codec_id,
        _signed64(header.checksum),
        meta.group,
        None if meta.parent is None else bytes(meta.parent),
        meta.expire_at,
        seq,
        now,
    )


def _lock_directory(root: Path) -> int:
    """Locks the tier directory: two writers would reclaim each other's segments."""
    try:
        fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open the lock file of {root}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StorageError(
            f"disk tier {root} is already open (here or in another process): {exc}"
        ) from exc
    return fd


def _is_space_error(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _SPACE_ERRNOS
    return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _chunks(locs: list[_Loc], max_bytes: int) -> Iterator[list[_Loc]]:
    chunk: list[_Loc] = []
    nbytes = 0
    for loc in locs:
        if chunk and nbytes + loc.record_bytes > max_bytes:
            yield chunk
            chunk, nbytes = [], 0
        chunk.append(loc)
        nbytes += loc.record_bytes
    if chunk:
        yield chunk


def _skip(views: list[memoryview], nbytes: int) -> list[memoryview]:
    """``views`` without their first ``nbytes`` bytes."""
    rest = []
    for view in views:
        if nbytes >= view.nbytes:
            nbytes -= view.nbytes
        else:
            rest.append(view[nbytes:])
            nbytes = 0
    return rest


def _pwrite_all(fd: int, buffers: list[Any], offset: int) -> tuple[int, OSError | None]:
    """Writes ``buffers`` at ``offset``; returns the bytes written and the error."""
    views = [memoryview(buffer) for buffer in buffers]
    total = sum(view.nbytes for view in views)
    done = 0
    try:
        while done < total:
            num_written = os.pwritev(fd, views, offset + done)
            if num_written == 0:
                return done, OSError(errno.ENOSPC, "segment write made no progress")
            done += num_written
            views = _skip(views, num_written)
    except OSError as exc:
        return done, exc
    return done, None


def _pread_all(fd: int, views: list[memoryview], offset: int) -> None:
    total = sum(view.nbytes for view in views)
    done = 0
    while done < total:
        num_read = os.preadv(fd, views, offset + done)
        if num_read == 0:
            raise CorruptBlockError(
                f"segment ends {total - done} bytes into the record"
            )
        done += num_read
        views = _skip(views, num_read)


def _check_header(header: RecordHeader, loc: _Loc) -> None:
    if header.key != loc.key:
        raise CorruptBlockError(f"record holds key {key_hex(header.key)}")
    if (header.stored_bytes, header.raw_bytes, header.codec_id) != (
        loc.stored_bytes,
        loc.raw_bytes,
        loc.codec_id,
    ):
        raise CorruptBlockError("record sizes or codec differ from the index")
    if _signed64(header.checksum) != loc.checksum:
        raise CorruptBlockError("record checksum differs from the index")


def _read_block(fd: int, loc: _Loc, dest: memoryview) -> None:
    """Reads and verifies a block into ``dest`` (straight in when uncompressed)."""
    header_buf = memoryview(bytearray(HEADER_BYTES))
    stored = dest if loc.codec_id == 0 else memoryview(bytearray(loc.stored_bytes))
    _pread_all(fd, [header_buf, stored], loc.offset)
    header = RecordHeader.unpack(header_buf)
    _check_header(header, loc)
    decode_into(header, stored, dest)


def _read_record(fd: int, loc: _Loc) -> memoryview:
    """Reads a whole record (header + stored payload) and verifies it."""
    record = memoryview(bytearray(loc.record_bytes))
    _pread_all(fd, [record], loc.offset)
    header = RecordHeader.unpack(record[:HEADER_BYTES])
    _check_header(header, loc)
    if checksum(record[HEADER_BYTES:]) != header.checksum:
        raise CorruptBlockError(f"checksum mismatch for block {key_hex(loc.key)}")
    return record
