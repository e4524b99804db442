"""The shared-FS tier: one directory many kvtier nodes mount (NFS, CephFS, Lustre).

Each block is one file under ``blocks/``, named by its key; it is written in
``tmp/`` and, if found corrupt, moved to ``quarantine/`` (the layout and the file
operations are :mod:`kvtier.tiers._shared_dir`). A file is one record of
:mod:`kvtier.tiers._record`: the 64-byte header (magic, key, sizes, checksum, expiry,
its own check) and the stored payload, compressed when that saves space.

**No shared index.** The directory *is* the index: a block's path follows from its
key, so a lookup is one ``open`` and nodes need agree on nothing else. A shared index
file would be rewritten by every node on every put (a hotspot under NFS's coarse
locking), and one torn write to it would lose the whole tier; here a torn write loses
at most one block, and that block's checksums detect it. What a file cannot say cheaply
(which blocks exist, how many bytes they take) is found by walking the tree in
:meth:`SharedFSTier.sweep` and :meth:`SharedFSTier.check`, which run rarely.

**Atomicity.** A writer writes the whole record into ``tmp/`` and only then gives it
its final name with ``link(2)`` (no-clobber) or ``rename(2)``. Both are atomic within
one filesystem on POSIX, and on NFS each is one operation the server performs
atomically; so a reader finds either no file or a complete one, never a partial one.
``link`` is preferred: it never replaces a file another node just stored, and its
"already exists" is success for content-addressed blocks (equal keys, equal bytes),
even when an NFS retransmission makes our own link look like someone else's. Where
hard links are unsupported the writer falls back to ``rename``; the last rename wins,
with identical content.

**Concurrency.** Nothing is locked. A reader holding an open file keeps reading that
inode even if another node replaces or unlinks the path (NFS clients keep it alive by
a silly rename, or report ``ESTALE``: a miss). A missing, vanished or stale file is a
miss; a file that fails its checks is moved to ``quarantine/``, counted, and a miss:
never an exception, never wrong bytes. Several nodes may sweep at once; a file another
node deleted first is skipped. A block read between a sweep's scan and its unlink may
still be evicted: this is a cache, and the next read is a miss. NFS clients cache
attributes and lookups for seconds (``actimeo``), so :meth:`SharedFSTier.contains` may
briefly disagree with another node; ``open`` revalidates (close-to-open consistency),
and correctness rests only on what a read verifies.

Recency for eviction is the file's mtime: a read hit refreshes it with ``utime``, at
most once per ``touch_interval_s`` per file, to spare metadata round trips. ``utime``
without an explicit time lets an NFS server stamp its own clock, the one that stamped
the file's creation, so nodes with skewed clocks still agree on the order.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Concatenate, ParamSpec, Self, TypeVar

import numpy as np

from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.errors import (
    ConfigError,
    CorruptBlockError,
    LayoutError,
    StorageError,
    StoreClosedError,
)
from kvtier.layout import as_block_array, get_codec
from kvtier.tiers._fsio import (
    close_quietly,
    dest_view,
    is_gone,
    same_file,
    unlink_quietly,
)
from kvtier.tiers._record import HEADER_BYTES, encode
from kvtier.tiers._shared_dir import (
    STALE_PART_S,
    BlockDir,
    expired,
    header_of,
    open_block,
    read_payload,
)

__all__ = [
    "STALE_PART_S",
    "CheckReport",
    "SharedFSStats",
    "SharedFSTier",
    "SweepReport",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SharedFSStats:
    """Counters of one tier instance (this node only), since it was opened."""

    reads: int = 0
    hits: int = 0
    misses: int = 0
    num_corrupt: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    write_failures: int = 0


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one :meth:`SharedFSTier.sweep` did.

    Attributes:
        num_scanned: Block files looked at (``quarantine/`` is neither scanned nor
            counted against capacity; operators empty it).
        num_expired: Expired blocks this sweep deleted.
        num_evicted: Least recently used blocks this sweep deleted for capacity.
        num_stale_parts: Abandoned ``.part`` files this sweep deleted.
        bytes_freed: Bytes of the block files this sweep deleted.
        bytes_remaining: Bytes of block files left, as far as this sweep saw.
    """

    num_scanned: int
    num_expired: int
    num_evicted: int
    num_stale_parts: int
    bytes_freed: int
    bytes_remaining: int


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What :meth:`SharedFSTier.check` found.

    Attributes:
        num_checked: Files found under ``blocks/`` (each read and verified).
        bad: ``(path, reason)`` of each file that failed (quarantined if fixed).
        stale_parts: Abandoned ``.part`` files (removed if fixed).
        fixed: Whether the bad files and stale parts were dealt with.
    """

    num_checked: int
    bad: tuple[tuple[str, str], ...]
    stale_parts: tuple[str, ...]
    fixed: bool

    @property
    def ok(self) -> bool:
        """No file failed verification (stale parts are litter, not damage)."""
        return not self.bad


class SharedFSTier:
    """Blocks as files in a directory shared by many nodes (see the module docstring).

    Thread-safe: all state lives in the filesystem except the counters, which are
    locked. Read paths never raise for a missing, vanished or corrupt block. Nodes
    sharing a directory should agree on the settings.

    Args:
        path: Root directory, on the shared mount; created if missing.
        capacity_bytes: Bytes of block files (headers included) the directory may hold
            before :meth:`sweep` evicts; ``None``: unbounded.
        compression: Codec for new blocks: "none", "lz4" or "zstd". Readers decode any.
        fsync: fsync each file (and its directory) before it becomes visible: survives
            a server crash, costs a commit round trip per block on NFS.
        high_watermark: Sweep evicts once usage exceeds this fraction of capacity,
        low_watermark: and stops when usage is at or below this fraction.
        touch_interval_s: A read hit refreshes a file's mtime at most this often.

    The settings are kept as plain attributes of the same names (``path`` a
    :class:`~pathlib.Path`).

    Raises:
        ConfigError: A setting is out of range, or the codec's package is missing.
        StorageError: The directories cannot be created.
    """

    name: ClassVar[str] = "shared_fs"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        capacity_bytes: int | None = None,
        compression: str = "none",
        fsync: bool = False,
        high_watermark: float = 0.9,
        low_watermark: float = 0.8,
        touch_interval_s: float = 60.0,
    ) -> None:
        _validate(capacity_bytes, high_watermark, low_watermark, touch_interval_s)
        self._codec = get_codec(compression)
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self.compression = compression
        self.fsync = fsync
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.touch_interval_s = touch_interval_s
        self._dir = BlockDir(self.path, fsync=fsync)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in fields(SharedFSStats)), 0)
        self._closed = False

    # -- public API ---------------------------------------------------------------

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        """Stores blocks; a block already stored (and not expired) is left as it is.

        Args:
            items: ``(key, block, meta)``; ``block`` is any C-contiguous buffer (numpy
                array, CPU torch tensor, bytes) of ``meta.nbytes`` bytes.

        Returns:
            Per item, whether the block is now stored. Out of space (ENOSPC, EDQUOT)
            and other I/O errors give ``False``, never an exception.

        Raises:
            LayoutError: A block is not a contiguous buffer of ``meta.nbytes`` bytes
                (checked for every item before anything is written).
            KeyFormatError: A key is not 16 bytes.
            StoreClosedError: The tier was closed.
        """
        self._check_open()
        batch = [
            (key, _payload_view(key, block, meta), meta) for key, block, meta in items
        ]
        now = time.time()
        return [self._write_one(key, view, meta, now) for key, view, meta in batch]

    def read_into(
        self, key: BlockKey, out: memoryview, now: float | None = None
    ) -> bool:
        """Reads a block into ``out`` (exactly its size), verified.

        Args:
            key: The block.
            out: A writable C-contiguous buffer of the block's raw size.
            now: Unix time to judge expiry by (default: the clock).

        Returns:
            ``True`` with the block in ``out``; ``False`` on a miss (absent, expired,
            vanished, corrupt, or a different size), with ``out``'s content unspecified.

        Raises:
            LayoutError: ``out`` is read-only or not contiguous.
            StoreClosedError: The tier was closed.
        """
        self._check_open()
        dest = dest_view(out)
        now = time.time() if now is None else now
        path = self._dir.block_path(key)
        num_bytes = self._guarded(path, key, self._read_open, path, key, dest, now)
        if num_bytes is None:
            self._count(reads=1, misses=1)
            return False
        self._count(reads=1, hits=1, bytes_read=num_bytes)
        return True

    def get(
        self, key: BlockKey, now: float | None = None
    ) -> np.ndarray[Any, Any] | None:
        """The verified block as a new array, or ``None`` (the remote-tier read)."""
        meta = self.meta(key, now)
        if meta is None:
            return None
        out = np.empty(meta.nbytes, dtype=np.uint8)
        return out if self.read_into(key, out.data, now) else None

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """For each key, whether its file exists (one ``stat`` each, no read).

        An expired block that no sweep has removed yet counts as present: telling
        would cost an open and a read per key. :meth:`read_into` is authoritative.
        """
        self._check_open()
        return [os.path.exists(self._dir.block_path(key)) for key in keys]

    def meta(self, key: BlockKey, now: float | None = None) -> BlockMeta | None:
        """The block's metadata from its header, or ``None`` if absent or expired.

        The header carries no quota group or parent, so those are the defaults.
        """
        self._check_open()
        now = time.time() if now is None else now
        path = self._dir.block_path(key)
        return self._guarded(path, key, _meta_of, key, now)

    def locate(self, key: BlockKey) -> tuple[Path, int, int] | None:
        """Where a block's record lives: its file, offset 0, the file's bytes."""
        self._check_open()
        path = self._dir.block_path(key)
        try:
            return Path(path), 0, os.stat(path).st_size
        except OSError:
            return None

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Deletes blocks; returns how many files this call removed."""
        self._check_open()
        return sum(unlink_quietly(self._dir.block_path(key)) for key in keys)

    def keys(self) -> Iterator[BlockKey]:
        """Every block key with a file, expired ones included (a walk of the tree).

        Raises:
            StorageError: The tree cannot be listed (raised while iterating).
        """
        self._check_open()
        return (key for key, _path in self._dir.scan())

    def sweep(self, now: float | None = None) -> SweepReport:
        """Deletes expired blocks, then the least recently used while over capacity.

        Usage above ``high_watermark * capacity_bytes`` triggers eviction, oldest mtime
        first, down to ``low_watermark * capacity_bytes``. Also removes ``.part``
        files older than :data:`STALE_PART_S`, and quarantines corrupt headers it
        meets. Safe to run on several nodes at once. An expired block is not
        unlinked by readers: a reader could delete a fresh copy another node had
        just renamed over it, so removal is left to the sweep, which runs rarely.

        Raises:
            StorageError: The tree cannot be listed.
            StoreClosedError: The tier was closed.
        """
        self._check_open()
        now = time.time() if now is None else now
        live, num_scanned, num_expired, bytes_expired = self._sweep_expired(now)
        num_evicted, bytes_evicted, bytes_remaining = self._evict(live)
        num_parts = sum(unlink_quietly(path) for path in self._dir.stale_parts(now))
        return SweepReport(
            num_scanned,
            num_expired,
            num_evicted,
            num_parts,
            bytes_expired + bytes_evicted,
            bytes_remaining,
        )

    def check(self, fix: bool = False) -> CheckReport:
        """Reads and verifies every file; with ``fix``, quarantines bad ones.

        Also lists ``.part`` files older than :data:`STALE_PART_S` and, with ``fix``,
        removes them. Blocks that vanish while being checked are not reported.

        Raises:
            StorageError: The tree cannot be listed, or ``fix`` could neither move nor
                delete a bad file.
        """
        self._check_open()
        num_checked = 0
        bad: list[tuple[str, str]] = []
        for path in self._dir.scan_files():
            num_checked += 1
            reason = self._dir.audit(path)
            if reason is not None:
                bad.append((path, reason))
                if fix and not self._dir.move_aside(path):
                    raise StorageError(f"cannot quarantine or delete {path}")
        stale = self._dir.stale_parts(time.time())
        if fix:
            for path in stale:
                unlink_quietly(path)
        return CheckReport(num_checked, tuple(bad), tuple(stale), fix)

    def stats(self) -> SharedFSStats:
        """A snapshot of this instance's counters."""
        with self._lock:
            return SharedFSStats(**self._counts)

    def close(self) -> None:
        """Marks the tier closed (idempotent); it holds no open files between calls."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------

    def _write_one(
        self, key: BlockKey, payload: memoryview, meta: BlockMeta, now: float
    ) -> bool:
        path = self._dir.block_path(key)
        # True: stored and live; False: stored but expired; None: absent (or corrupt,
        # and just quarantined). Probing first spares rewriting blocks many nodes put.
        existing = self._guarded(path, key, self._probe, path, key, now)
        if existing:
            return True
        expire_at = 0.0 if math.isinf(meta.expire_at) else meta.expire_at
        header, stored = encode(key, payload, self._codec, expire_at)
        try:
            self._dir.publish(path, header.pack(), stored, replace=existing is False)
        except OSError as exc:
            log.warning("shared_fs: cannot store block %s: %s", key.hex(), exc)
            self._count(write_failures=1)
            return False
        self._count(bytes_written=HEADER_BYTES + header.stored_bytes)
        return True

    # -- reading ------------------------------------------------------------------

    def _guarded(
        self,
        path: str,
        key: BlockKey,
        fn: Callable[Concatenate[int, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """``fn(fd, ...)`` on the opened file; a miss (``None``) on any I/O error.

        A :class:`CorruptBlockError` from ``fn`` quarantines the file, and so does
        a link or a non-regular file planted at ``path`` (:func:`open_block`).
        """
        try:
            fd = open_block(path)
        except CorruptBlockError as exc:  # nothing kvtier wrote: set it aside
            self._count(num_corrupt=1)
            log.warning("shared_fs: %s; quarantining", exc)
            self._dir.move_aside(path)
            return None
        except OSError as exc:
            _log_unless_gone(exc, key)
            return None
        try:
            return fn(fd, *args, **kwargs)
        except CorruptBlockError as exc:
            self._quarantine(path, fd, key, exc)
        except OSError as exc:
            _log_unless_gone(exc, key)
        finally:
            close_quietly(fd)
        return None

    def _read_open(
        self, fd: int, path: str, key: BlockKey, dest: memoryview, now: float
    ) -> int | None:
        header, st = header_of(fd, key)
        if expired(header.expire_at, now):
            return None
        if header.raw_bytes != len(dest):
            # The file is sound; the caller's buffer is not the block's size.
            log.warning(
                "shared_fs: block %s is %s bytes, destination holds %s",
                key.hex(),
                header.raw_bytes,
                len(dest),
            )
            return None
        read_payload(fd, header, dest)
        self._touch(path, st, now)
        return HEADER_BYTES + header.stored_bytes

    def _probe(self, fd: int, path: str, key: BlockKey, now: float) -> bool:
        header, st = header_of(fd, key)
        if expired(header.expire_at, now):
            return False
        self._touch(path, st, now)  # a repeated put is a use, too
        return True

    def _touch(self, path: str, st: os.stat_result, now: float) -> None:
        if now - st.st_mtime < self.touch_interval_s:
            return
        try:
            os.utime(path)  # no explicit time: the server's clock (module docstring)
        except OSError as exc:
            log.debug("shared_fs: cannot refresh mtime of %s: %s", path, exc)

    def _quarantine(
        self, path: str, fd: int, key: BlockKey, exc: CorruptBlockError
    ) -> None:
        self._count(num_corrupt=1)
        log.warning("shared_fs: block %s is corrupt (%s); quarantining", key.hex(), exc)
        # Another node may have replaced or removed the bad file since we opened it;
        # then the path holds a good block (or nothing) and must be left alone.
        if same_file(path, fd):
            self._dir.move_aside(path)

    # -- sweeping -----------------------------------------------------------------

    def _sweep_expired(
        self, now: float
    ) -> tuple[list[tuple[float, str, int]], int, int, int]:
        """Deletes expired blocks; returns the live ones as ``(mtime, path, size)``."""
        live: list[tuple[float, str, int]] = []
        num_scanned = num_expired = bytes_expired = 0
        for key, path in self._dir.scan():
            num_scanned += 1
            found = self._guarded(path, key, header_of, key)
            if found is None:
                continue  # vanished or quarantined
            header, st = found
            if not expired(header.expire_at, now):
                live.append((st.st_mtime, path, st.st_size))
            elif unlink_quietly(path):
                num_expired += 1
                bytes_expired += st.st_size
        return live, num_scanned, num_expired, bytes_expired

    def _evict(self, live: list[tuple[float, str, int]]) -> tuple[int, int, int]:
        """LRU eviction down to the low watermark: ``(num, bytes freed, remaining)``."""
        total = sum(size for _mtime, _path, size in live)
        capacity = self.capacity_bytes
        if capacity is None or total <= self.high_watermark * capacity:
            return 0, 0, total
        target = self.low_watermark * capacity
        num_evicted = bytes_freed = 0
        for _mtime, path, size in sorted(live):  # oldest first; path breaks ties
            if total <= target:
                break
            total -= size  # gone either way: by us, or by a sweeper on another node
            if unlink_quietly(path):
                num_evicted += 1
                bytes_freed += size
        return num_evicted, bytes_freed, total

    # -- plumbing -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"shared-FS tier at {self.path} is closed")

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta


def _meta_of(fd: int, key: BlockKey, now: float) -> BlockMeta | None:
    header, _st = header_of(fd, key)
    if expired(header.expire_at, now):
        return None
    expire_at = math.inf if header.expire_at == 0.0 else header.expire_at
    return BlockMeta(header.raw_bytes, expire_at=expire_at)


def _payload_view(key: BlockKey, block: Any, meta: BlockMeta) -> memoryview:
    arr = as_block_array(block)
    if not arr.flags.c_contiguous:
        raise LayoutError(f"block {key.hex()} must be C-contiguous to be stored")
    view = arr.reshape(-1).view(np.uint8).data
    if len(view) != meta.nbytes:
        raise LayoutError(
            f"block {key.hex()} is {len(view)} bytes, its meta says {meta.nbytes}"
        )
    return view


def _log_unless_gone(exc: OSError, key: BlockKey) -> None:
    if not is_gone(exc):
        log.warning("shared_fs: I/O error on block %s: %s", key.hex(), exc)


def _validate(
    capacity_bytes: int | None,
    high_watermark: float,
    low_watermark: float,
    touch_interval_s: float,
) -> None:
    """Checks the constructor's arguments (``get_codec`` checks ``compression``).

    :mod:`kvtier.config` validates the config keys; the tier checks its arguments
    again because it is also built directly, from other sources than a config.
    """
    capacity = capacity_bytes
    if capacity is not None and (
        not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0
    ):
        raise ConfigError(
            f"shared_fs.capacity_bytes must be a positive int or None, got {capacity!r}"
        )
    if not 0.0 < low_watermark < high_watermark <= 1.0:
        raise ConfigError(
            "shared_fs watermarks need 0 < low_watermark < high_watermark <= 1, "
            f"got low_watermark={low_watermark!r}, high_watermark={high_watermark!r}"
        )
    if not 0.0 <= touch_interval_s < math.inf:
        raise ConfigError(
            "shared_fs.touch_interval_s must be a finite number >= 0, "
            f"got {touch_interval_s!r}"
        )
