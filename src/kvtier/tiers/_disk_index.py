"""The disk tier's index: where each block's record lies, in SQLite and in memory.

``index.sqlite3`` (WAL journal) holds, at schema version 1::

    meta    name TEXT PRIMARY KEY, value TEXT      ("schema_version", "1")
    blocks  key BLOB PRIMARY KEY, segment, offset, stored_bytes, raw_bytes, codec,
            checksum, grp, parent, expire_at, seq, written_at      WITHOUT ROWID

:class:`DiskIndex` opens it while holding ``lock`` (``flock()``: one tier per
directory), loads every row once into a dict of :class:`Loc` (100,000 rows in
~0.3 s; reads never query SQLite again) and runs the tier's transactions, one per
batch. ``synchronous`` is FULL when the tier fsyncs (a committed batch survives power
loss) and NORMAL otherwise (a crash may lose the last commits, never consistency).
``check()`` reads the rows again in file order and reports in a :class:`CheckReport`.

``seq`` is the write order, so a reopened tier lists blocks oldest first. Checksums
are stored signed: SQLite integers are signed 64-bit.
"""

from __future__ import annotations

import fcntl
import gc
import operator
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey, key_hex
from kvtier.errors import StorageError
from kvtier.tiers._record import HEADER_BYTES, RecordHeader

if TYPE_CHECKING:
    from kvtier.tiers._segments import SegmentLog

__all__ = [
    "DELETE",
    "INSERT",
    "MOVE",
    "SCHEMA_VERSION",
    "CheckReport",
    "DiskIndex",
    "Loc",
    "insert_row",
    "lock_directory",
    "open_index_db",
    "signed64",
]

SCHEMA_VERSION = "1"
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
INSERT = f"INSERT OR REPLACE INTO blocks ({_COLUMNS}, written_at) VALUES ({'?,' * 11}?)"
MOVE = "UPDATE blocks SET segment = ?, offset = ? WHERE key = ?"
DELETE = "DELETE FROM blocks WHERE key = ?"


class Loc(NamedTuple):
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


class DiskIndex:
    """The index of one tier directory: the SQLite file, its rows in memory, a lock.

    ``locs`` holds every row by key, in write order: what lookups and reads use. It
    mirrors SQLite: the tier changes it (:meth:`add`, :meth:`remove`, :meth:`move`)
    only after the transaction making the same change has committed, under the tier's
    state lock, and each change keeps the live bytes of the segments of ``log`` in
    step. The lock file is ``flock()``ed while open: two tiers on one directory would
    reclaim each other's segments.

    Raises:
        StorageError: The directory is locked by another tier, or the index cannot
            be opened, read or has another schema version.
    """

    def __init__(self, root: Path, log: SegmentLog, *, fsync: bool) -> None:
        self._lock_fd = lock_directory(root)
        try:
            self._db, self.created = _open_db(root / "index.sqlite3", fsync=fsync)
        except StorageError:
            os.close(self._lock_fd)
            raise
        try:
            self.locs = _load(self._db)
        except sqlite3.Error as exc:
            self.close()
            raise StorageError(f"cannot load disk tier index in {root}: {exc}") from exc
        self.next_seq = next(reversed(self.locs.values())).seq + 1 if self.locs else 1
        self._log = log

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)

    def run(self, statement: str, rows: list[Any]) -> None:
        """Runs ``statement`` over ``rows`` in one transaction, rolled back on error."""
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(statement, rows)
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def by_position(self) -> list[Loc]:
        """Every row from SQLite, by segment and offset: the order an audit reads."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM blocks ORDER BY segment, offset"
        )
        return [Loc._make(row) for row in rows.fetchall()]

    def live_per_segment(self) -> dict[int, int]:
        live: dict[int, int] = {}
        for loc in self.locs.values():
            live[loc.segment_id] = live.get(loc.segment_id, 0) + loc.record_bytes
        return live

    def in_segment(self, segment_id: int) -> list[Loc]:
        """The rows whose records lie in the segment, by offset."""
        locs = [loc for loc in self.locs.values() if loc.segment_id == segment_id]
        return sorted(locs, key=lambda loc: loc.offset)

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        """Adds committed :data:`INSERT` rows (replacing expired blocks)."""
        for row in rows:
            loc = Loc._make(row[:11])
            old = self.locs.pop(loc.key, None)
            if old is not None:
                self._log.charge(old.segment_id, -old.record_bytes)
            self.locs[loc.key] = loc
            self._log.charge(loc.segment_id, loc.record_bytes)
        self.next_seq += len(rows)

    def remove(self, keys: Iterable[bytes]) -> int:
        """Drops committed deletions; returns how many of ``keys`` were here."""
        num_removed = 0
        for key in keys:
            loc = self.locs.pop(key, None)
            if loc is not None:
                num_removed += 1
                self._log.charge(loc.segment_id, -loc.record_bytes)
        return num_removed

    def move(self, moved: list[tuple[Loc, tuple[int, int]]]) -> None:
        """Applies committed :data:`MOVE` s: each row to its new (segment, offset)."""
        for loc, (segment_id, offset) in moved:  # in place: keeps the write order
            self.locs[loc.key] = loc._replace(segment_id=segment_id, offset=offset)
            self._log.charge(loc.segment_id, -loc.record_bytes)
            self._log.charge(segment_id, loc.record_bytes)


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

    @classmethod
    def of(
        cls, num_checked: int, bad: list[tuple[bytes, str]], orphans: list[Path]
    ) -> CheckReport:
        """The report of an audit: bad rows as ``(key, reason)``, orphan paths."""
        return cls(
            num_checked,
            tuple((key_hex(key), reason) for key, reason in bad),
            tuple(path.name for path in orphans),
        )


def lock_directory(root: Path) -> int:
    """``flock()`` s the tier directory's lock file; the fd holds it until closed.

    Raises:
        StorageError: Another tier (here or in another process) holds it.
    """
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


def open_index_db(db_path: Path, *, fsync: bool) -> sqlite3.Connection:
    """Opens (creating if new) an index file without loading or locking it: for
    rebuilding one (``_disk_rebuild.py``).

    Raises:
        StorageError: As :func:`_open_db`.
    """
    return _open_db(db_path, fsync=fsync)[0]


def _open_db(db_path: Path, *, fsync: bool) -> tuple[sqlite3.Connection, bool]:
    """Opens (creating if new) the index; also whether it was just created.

    Raises:
        StorageError: It cannot be opened or read, or has another schema version.
    """
    try:
        db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open disk tier index {db_path}: {exc}") from exc
    try:
        created, version = _prepare(db, fsync=fsync)
    except sqlite3.Error as exc:
        db.close()
        raise StorageError(f"cannot read disk tier index {db_path}: {exc}") from exc
    if version != SCHEMA_VERSION:
        db.close()
        raise StorageError(
            f"disk tier index {db_path} has schema version {version!r}, "
            f"this kvtier reads {SCHEMA_VERSION!r}"
        )
    return db, created


def _prepare(db: sqlite3.Connection, *, fsync: bool) -> tuple[bool, str | None]:
    """Sets the pragmas, creates the schema if the file is new; its schema version."""
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    db.execute("BEGIN IMMEDIATE")  # two openers must not both create the schema
    tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    created = not tables.fetchall()
    if created:
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
    row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    db.execute("COMMIT")
    return created, None if row is None else row[0]


def _load(db: sqlite3.Connection) -> dict[bytes, Loc]:
    """Every row, by key, in write order (oldest first)."""
    # Sorting in Python is twice as fast as ORDER BY over a column without an index,
    # and pausing the cyclic GC while 100k tuples are made saves another third.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        rows = db.execute(f"SELECT {_COLUMNS} FROM blocks").fetchall()
        rows.sort(key=operator.itemgetter(10))  # seq
        new = tuple.__new__
        return {row[0]: new(Loc, row) for row in rows}
    finally:
        if gc_was_enabled:
            gc.enable()


def insert_row(
    key: BlockKey,
    header: RecordHeader,
    meta: BlockMeta,
    place: tuple[int, int],
    seq: int,
    now: float,
) -> tuple[Any, ...]:
    """The :data:`INSERT` parameters of a block written at ``place`` (segment, offset).

    The first eleven are a :class:`Loc`.
    """
    segment_id, offset = place
    return (
        bytes(key),
        segment_id,
        offset,
        header.stored_bytes,
        header.raw_bytes,
        header.codec_id,
        signed64(header.checksum),
        meta.group,
        None if meta.parent is None else bytes(meta.parent),
        meta.expire_at,
        seq,
        now,
    )


def signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value
