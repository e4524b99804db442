"""The disk tier's segment log: append-only files of records, and reading them back.

Layout under the tier directory::

    segments/000000000001.seg   records packed back to back, append-only
    segments/000000000002.seg   ...

A record is a 64-byte :class:`~kvtier.tiers._record.RecordHeader` and the stored
payload (see ``_record.encode``), with no alignment. One segment is *active* at a
time; it is sealed when the next record would take it past ``segment_bytes``. After a
restart the log never appends to an old segment, whose tail a crash may have torn: it
starts the next id.

Appending. A batch (:class:`Batch`) packs many records into each ``pwritev``. When a
write fails part way, the segment is cut back to its last whole record and the records
that landed are reported, so the tier can commit those or undo the whole batch (cut
every segment it touched back to its size before it). A segment whose cut fails keeps
its torn tail, never read, and is sealed so nothing lands after it.

Reading. Readers share one read-only fd per segment, kept in a small LRU. An fd that is
evicted, or whose segment is unlinked, while a reader uses it stays open until that
reader lets go: an unlinked file stays readable through an open fd.

Compaction. When the tier needs space, the sealed segment with the lowest live ratio,
if under ``COMPACT_MAX_LIVE_RATIO`` (0.5), has its live records appended anew, their
rows moved in one transaction, then its file unlinked. Each byte copied frees more
than one byte, so compaction at most doubles the bytes written (write amplification
< 2), and far less in practice since the emptiest segment goes first. While it runs,
usage may pass the capacity by the live bytes being copied, under half a segment.

Every read checks the record against its index row (key, sizes, codec, checksum) and
the payload against its checksum; a mismatch is :class:`CorruptBlockError`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.core.keys import key_hex
from kvtier.errors import CorruptBlockError, StorageError
from kvtier.layout import checksum
from kvtier.tiers._disk_index import Loc, signed64
from kvtier.tiers._fsio import (
    IOV_MAX,
    close_quietly,
    fsync_dir,
    list_dir,
    pread_exact,
    preadv_exact,
    pwritev_until_error,
)
from kvtier.tiers._record import HEADER_BYTES, RecordHeader, decode_into

__all__ = [
    "Batch",
    "Moved",
    "OpenFile",
    "Segment",
    "SegmentLog",
    "clamp_segment_bytes",
]

logger = logging.getLogger(__name__)

MIN_SEGMENT_BYTES = 2**20
SEGMENTS_PER_CAPACITY = 16  # segment_bytes is clamped to capacity / 16 (>= 1 MiB)
COMPACT_MAX_LIVE_RATIO = 0.5  # only a segment under half live is worth copying out
COMPACT_CHUNK_BYTES = 32 * 2**20  # live records read per step of a compaction

Moved = tuple[Loc, tuple[int, int]]  # a row, and the (segment id, offset) it moved to
_SEGMENT_NAME = re.compile(r"^(\d{12})\.seg$")


@dataclass(slots=True)
class Segment:
    """One segment file and what the tier knows of it."""

    segment_id: int
    path: Path
    size: int = 0  # bytes in the file
    live_bytes: int = 0  # record bytes of blocks the index points at
    sealed: bool = False


@dataclass(slots=True)
class OpenFile:
    """A read fd shared by readers; closed when evicted or unlinked and unused."""

    fd: int
    refs: int = 0
    retired: bool = False


@dataclass(slots=True)
class Batch:
    """The segments one batch appended to, for fsync, undo and closing their fds.

    ``touched`` holds ``(segment, its write fd, its size before the batch)``.
    """

    touched: list[tuple[Segment, int, int]] = field(default_factory=list)
    created_files: bool = False

    def touches(self, seg: Segment) -> bool:
        return any(touched is seg for touched, _, _ in self.touched)


class SegmentLog:
    """The segment files of one disk tier: their sizes, live bytes and fds.

    The tier serializes every change to the files (append, cut, seal, reclaim) under
    its write lock. ``lock`` is the tier's state lock: the log takes it around changes
    that readers see (the segment table, sizes) and never holds it across I/O.
    Methods marked *lock held* expect the caller to hold it.
    """

    def __init__(
        self,
        root: Path,
        *,
        segment_bytes: int,
        max_open_files: int,
        fsync: bool,
        lock: threading.Lock,
    ) -> None:
        self.directory = root / "segments"
        self.segment_bytes = segment_bytes
        self.segments: dict[int, Segment] = {}
        self.used_bytes = 0  # of all segment files: live, garbage and torn tails
        self.active: Segment | None = None
        self._active_fd = -1
        self._next_segment_id = 1
        self._open_files: OrderedDict[int, OpenFile] = OrderedDict()
        self._max_open_files = max_open_files
        self._fsync = fsync
        self._lock = lock
        self._root = root

    def path_of(self, segment_id: int) -> Path:
        return self.directory / f"{segment_id:012d}.seg"

    def files(self) -> list[tuple[int, Path]]:
        """``(segment id, path)`` of the segment files on disk, by id.

        Raises:
            StorageError: The directory cannot be listed.
        """
        return segment_files(self.directory)

    def load(self, live: dict[int, int], *, adopt: bool) -> bool:
        """Takes over the files found, given the live bytes the index counts in each.

        Never reuses an id. With ``adopt`` False (a new index beside old files) the
        files are left alone, since adopting them would unlink them; returns whether
        they were adopted.
        """
        files = self.files()
        self._next_segment_id = max([sid for sid, _ in files] + [*live], default=0) + 1
        if files and not adopt:
            logger.warning(
                "disk tier %s: new index beside %d segment files; check(fix=True) "
                "removes them",
                self._root,
                len(files),
            )
            return False
        for segment_id, path in files:
            seg = Segment(segment_id, path, path.stat().st_size, sealed=True)
            self.segments[segment_id] = seg
        missing = sorted(set(live) - set(self.segments))
        if missing:
            logger.warning(
                "disk tier %s: segment files %s are missing", self._root, missing
            )
        for segment_id in missing:
            seg = Segment(segment_id, self.path_of(segment_id), sealed=True)
            self.segments[segment_id] = seg
        for segment_id, nbytes in live.items():
            self.segments[segment_id].live_bytes = nbytes
        self.used_bytes = sum(seg.size for seg in self.segments.values())
        return True

    def live_bytes(self) -> int:
        """Record bytes of the blocks stored (lock held)."""
        return sum(seg.live_bytes for seg in self.segments.values())

    def charge(self, segment_id: int, nbytes: int) -> None:
        """Counts ``nbytes`` more (or, negative, fewer) live bytes (lock held)."""
        self.segments[segment_id].live_bytes += nbytes

    # -- read fds ---------------------------------------------------------------------

    def acquire(self, segment_id: int) -> OpenFile:
        """A read fd of the segment, until :meth:`release` (lock held)."""
        handle = self._open_files.get(segment_id)
        if handle is None:
            path = self.path_of(segment_id)
            handle = OpenFile(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            self._open_files[segment_id] = handle
            while len(self._open_files) > self._max_open_files:
                _, evicted = self._open_files.popitem(last=False)
                self._retire(evicted)
        else:
            self._open_files.move_to_end(segment_id)
        handle.refs += 1
        return handle

    def read(self, handle: OpenFile, loc: Loc, dest: memoryview) -> str:
        """Reads a block with an acquired fd, then releases it; why it failed or "".

        On failure ``dest`` holds garbage.
        """
        failure = ""
        try:
            _read_block(handle.fd, loc, dest)
        except (CorruptBlockError, OSError) as exc:
            failure = str(exc) or type(exc).__name__
        finally:
            with self._lock:
                self.release(handle)
        return failure

    def release(self, handle: OpenFile) -> None:
        """Lock held."""
        handle.refs -= 1
        if handle.retired and handle.refs == 0:
            os.close(handle.fd)

    def close_reads(self) -> None:
        """Closes every read fd; in-flight reads close theirs when done (lock held)."""
        for handle in self._open_files.values():
            self._retire(handle)
        self._open_files.clear()

    def _retire(self, handle: OpenFile) -> None:
        handle.retired = True
        if handle.refs == 0:
            os.close(handle.fd)

    # -- appending --------------------------------------------------------------------

    def append(
        self, batch: Batch, records: list[list[Any]], sizes: list[int]
    ) -> tuple[list[tuple[int, int]], OSError | None]:
        """Appends records (each a list of buffers); where the whole ones landed.

        Returns:
            ``(segment id, offset)`` of each record that landed whole, in order, and
            the error that stopped the rest (the segment is cut back to its last
            whole record first), or ``None``.
        """
        placements: list[tuple[int, int]] = []
        i = 0
        while i < len(records):
            try:
                seg, fd = self._writable(batch, sizes[i])
            except OSError as exc:
                return placements, exc
            start = good = seg.size
            j = self._run_end(records, sizes, i, start)
            buffers = list(itertools.chain.from_iterable(records[i:j]))
            written, error = pwritev_until_error(fd, buffers, start)
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

    def _run_end(
        self, records: list[list[Any]], sizes: list[int], i: int, start: int
    ) -> int:
        """End of the run of records from ``i`` that one write appends at ``start``."""
        j, end, num_buffers = i, start, 0
        while j < len(records) and num_buffers + len(records[j]) <= IOV_MAX:
            if j > i and end + sizes[j] > self.segment_bytes:
                break
            num_buffers += len(records[j])
            end += sizes[j]
            j += 1
        return j

    def _writable(self, batch: Batch, record_bytes: int) -> tuple[Segment, int]:
        seg = self.active
        if seg is None or (seg.size and seg.size + record_bytes > self.segment_bytes):
            self.seal_active(batch)
            segment_id = self._next_segment_id
            self._next_segment_id += 1
            path = self.path_of(segment_id)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(path, flags, 0o644)
            seg = Segment(segment_id, path)
            batch.created_files = True
            with self._lock:
                self.segments[segment_id] = seg
            self.active, self._active_fd = seg, fd
        if not batch.touches(seg):
            batch.touched.append((seg, self._active_fd, seg.size))
        return seg, self._active_fd

    def seal_active(self, batch: Batch | None = None) -> None:
        """Stops appending to the active segment.

        Its write fd is closed now, or by :meth:`end_batch` when ``batch`` still
        needs it (for fsync or undo).
        """
        seg, fd = self.active, self._active_fd
        if seg is None:
            return
        with self._lock:
            seg.sealed = True
        self.active, self._active_fd = None, -1
        if batch is None or not batch.touches(seg):
            close_quietly(fd)

    def close_writes(self) -> Path | None:
        """Seals the active segment; its path when nothing live is in it (garbage)."""
        active = self.active
        self.seal_active()
        return active.path if active is not None and active.live_bytes == 0 else None

    def _cut(
        self, batch: Batch, seg: Segment, fd: int, good: int, physical: int
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
                if seg is self.active:
                    self.seal_active(batch)
        with self._lock:
            self.used_bytes += good - seg.size
            seg.size = good

    def sync(self, batch: Batch) -> None:
        """With ``fsync``, makes what the batch appended (and created) durable."""
        if not self._fsync:
            return
        for _, fd, _ in batch.touched:
            os.fdatasync(fd)
        if batch.created_files:
            fsync_dir(self.directory)

    def undo(self, batch: Batch) -> None:
        """Cuts every segment the batch touched back to its size before the batch."""
        for seg, fd, before in batch.touched:
            self._cut(batch, seg, fd, before, seg.size)

    def end_batch(self, batch: Batch) -> None:
        for seg, fd, _ in batch.touched:
            if seg is not self.active:
                close_quietly(fd)

    # -- reclaim, compaction, audit ---------------------------------------------------

    def drop_empty(self) -> list[Path]:
        """Forgets sealed segments with no live bytes; their paths (lock held)."""
        dead = [s for s in self.segments.values() if s.sealed and s.live_bytes == 0]
        return [self._drop(seg) for seg in dead]

    def drop_files(self, paths: list[Path]) -> None:
        """Forgets the segments of ``paths``, but the active one (lock held)."""
        for path in paths:
            seg = self.segments.get(int(path.stem))
            if seg is not None and seg is not self.active:
                self._drop(seg)

    def _drop(self, seg: Segment) -> Path:
        del self.segments[seg.segment_id]
        self.used_bytes -= seg.size
        handle = self._open_files.pop(seg.segment_id, None)
        if handle is not None:
            self._retire(handle)  # a reader still on it keeps reading the unlinked file
        return seg.path

    def compaction_victims(
        self, incoming_bytes: int, limit_bytes: float
    ) -> Iterator[Segment]:
        """Segments to compact, one at a time, while the files would pass a limit.

        Each is the sealed segment with the lowest live ratio, if under
        ``COMPACT_MAX_LIVE_RATIO``; the caller compacts it before asking for the next.
        Stops when a compaction freed nothing, so it never loops without progress.
        """
        while self.used_bytes + incoming_bytes > limit_bytes:
            used_before = self.used_bytes
            with self._lock:
                sealed = [s for s in self.segments.values() if s.sealed and s.size]
            victim = min(sealed, key=_live_ratio, default=None)
            if victim is None or _live_ratio(victim) >= COMPACT_MAX_LIVE_RATIO:
                return
            yield victim
            if self.used_bytes >= used_before:
                return

    def compact(
        self, fd: int, locs: list[Loc], commit: Callable[[list[Moved]], None]
    ) -> tuple[list[Moved], list[bytes]]:
        """Copies the records of ``locs`` (read from ``fd``) to the active segment.

        The copies are synced, then ``commit`` makes their new places durable in the
        index; if anything fails the copies are cut off again and the error raised.

        Returns:
            Each copied row with its new ``(segment id, offset)``, and the keys of
            the records that failed verification (not copied).
        """
        batch = Batch()
        try:
            moved, bad = self._copy_records(batch, fd, locs)
            self.sync(batch)
            commit(moved)
        except BaseException:
            self.undo(batch)
            raise
        finally:
            self.end_batch(batch)
        return moved, bad

    def _copy_records(
        self, batch: Batch, fd: int, locs: list[Loc]
    ) -> tuple[list[Moved], list[bytes]]:
        moved: list[Moved] = []
        bad: list[bytes] = []
        for chunk in _chunks(locs, COMPACT_CHUNK_BYTES):
            good = []
            for loc in chunk:
                try:
                    good.append((loc, _read_record(fd, loc)))
                except (CorruptBlockError, OSError):
                    bad.append(loc.key)
            records = [[record] for _, record in good]
            sizes = [loc.record_bytes for loc, _ in good]
            placements, error = self.append(batch, records, sizes)
            moved += zip([loc for loc, _ in good], placements, strict=False)
            if error is not None:
                raise error
        return moved, bad

    def audit(self, locs: list[Loc]) -> tuple[list[tuple[bytes, str]], list[Path]]:
        """Verifies the records of ``locs`` (by segment and offset), finds orphans.

        Returns:
            ``(key, reason)`` of each row whose record fails, and the segment files
            that no row (nor appending) uses.

        Raises:
            StorageError: The segment directory cannot be listed.
        """
        bad: list[tuple[bytes, str]] = []
        for segment_id, group in itertools.groupby(locs, lambda loc: loc.segment_id):
            bad += self._audit_segment(segment_id, list(group))
        referenced = {loc.segment_id for loc in locs}
        if self.active is not None:
            referenced.add(self.active.segment_id)
        orphans = [path for sid, path in self.files() if sid not in referenced]
        return bad, orphans

    def _audit_segment(
        self, segment_id: int, locs: list[Loc]
    ) -> list[tuple[bytes, str]]:
        try:
            fd = os.open(self.path_of(segment_id), os.O_RDONLY | os.O_CLOEXEC)
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

    def drop_page_cache(self) -> None:
        """Fsyncs each segment file, then advises the kernel to evict its pages.

        Raises:
            StorageError: A file could not be opened (but for a vanished one) or synced.
        """
        with self._lock:
            paths = [seg.path for seg in self.segments.values()]
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


def segment_files(directory: Path) -> list[tuple[int, Path]]:
    """``(segment id, path)`` of the segment files in ``directory``, by id.

    Raises:
        StorageError: The directory cannot be listed.
    """
    found = []
    for entry in list_dir(directory):
        match = _SEGMENT_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match[1]), Path(entry.path)))
    return sorted(found)


def clamp_segment_bytes(segment_bytes: int, capacity_bytes: int) -> int:
    """At most ``capacity / 16``, so compaction has segments to choose from."""
    cap = max(MIN_SEGMENT_BYTES, capacity_bytes // SEGMENTS_PER_CAPACITY)
    return min(segment_bytes, cap)


def _read_block(fd: int, loc: Loc, dest: memoryview) -> None:
    """Reads and verifies a block into ``dest`` (straight in when uncompressed)."""
    header_buf = memoryview(bytearray(HEADER_BYTES))
    stored = dest if loc.codec_id == 0 else memoryview(bytearray(loc.stored_bytes))
    preadv_exact(fd, [header_buf, stored], loc.offset)
    header = RecordHeader.unpack(header_buf)
    _check_header(header, loc)
    decode_into(header, stored, dest)


def _read_record(fd: int, loc: Loc) -> memoryview:
    """Reads a whole record (header + stored payload) and verifies it."""
    record = pread_exact(fd, loc.record_bytes, loc.offset)
    header = RecordHeader.unpack(record[:HEADER_BYTES])
    _check_header(header, loc)
    if checksum(record[HEADER_BYTES:]) != header.checksum:
        raise CorruptBlockError(f"checksum mismatch for block {key_hex(loc.key)}")
    return record


def _check_header(header: RecordHeader, loc: Loc) -> None:
    if header.key != loc.key:
        raise CorruptBlockError(f"record holds key {key_hex(header.key)}")
    if (header.stored_bytes, header.raw_bytes, header.codec_id) != (
        loc.stored_bytes,
        loc.raw_bytes,
        loc.codec_id,
    ):
        raise CorruptBlockError("record sizes or codec differ from the index")
    if signed64(header.checksum) != loc.checksum:
        raise CorruptBlockError("record checksum differs from the index")


def _live_ratio(seg: Segment) -> float:
    return seg.live_bytes / seg.size


def _chunks(locs: list[Loc], max_bytes: int) -> Iterator[list[Loc]]:
    chunk: list[Loc] = []
    nbytes = 0
    for loc in locs:
        if chunk and nbytes + loc.record_bytes > max_bytes:
            yield chunk
            chunk, nbytes = [], 0
        chunk.append(loc)
        nbytes += loc.record_bytes
    if chunk:
        yield chunk
