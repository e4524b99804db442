"""Rebuilding a disk tier's index from its segment files, when the index is lost.

Every record carries a self-checking header with its key and sizes, and a checksum of
its payload (``_record.py``), so the segment files alone say which blocks they hold.
A rebuild walks each segment from its start, record by record, keeps every record that
verifies, and stops at the first that does not (a torn tail; no length can be trusted
past it). What the index knew beyond the header is lost: every block comes back in the
``default`` quota group, without its parent, and blocks deleted whose records were
not reclaimed yet come back too (a cache may serve them: equal keys mean equal bytes).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from kvtier.core.index import BlockMeta
from kvtier.errors import CorruptBlockError, StorageError
from kvtier.layout import checksum
from kvtier.tiers._disk_index import (
    INSERT,
    insert_row,
    lock_directory,
    open_index_db,
)
from kvtier.tiers._fsio import pread_exact
from kvtier.tiers._record import HEADER_BYTES, RecordHeader
from kvtier.tiers._segments import segment_files

__all__ = ["rebuild_index"]


def rebuild_index(root: Path) -> int:
    """Sets the index of the tier at ``root`` aside and builds a new one from the
    segment files; returns how many blocks it holds.

    The tier must not be open.

    Raises:
        StorageError: The segment files cannot be listed or the new index written.
    """
    lock_fd = lock_directory(root)  # no node may have the tier open meanwhile
    try:
        return _rebuild(root)
    finally:
        os.close(lock_fd)


def _rebuild(root: Path) -> int:
    db_path = root / "index.sqlite3"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        old = Path(f"{db_path}{suffix}")
        if old.exists():
            old.rename(old.with_name(f"{old.name}.bad-{stamp}"))
    rows: dict[bytes, tuple[Any, ...]] = {}
    now = time.time()
    for segment_id, path in segment_files(root / "segments"):
        for offset, header in _records(path):
            meta = BlockMeta(
                header.raw_bytes,
                expire_at=header.expire_at if header.expire_at > 0 else float("inf"),
            )
            seq = len(rows) + 1  # later records win: re-puts and compaction copies
            rows.pop(header.key, None)
            rows[header.key] = insert_row(
                header.key, header, meta, (segment_id, offset), seq, now
            )
    db = open_index_db(db_path, fsync=True)
    try:
        db.execute("BEGIN")
        db.executemany(INSERT, list(rows.values()))
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot write the rebuilt index {db_path}: {exc}") from exc
    finally:
        db.close()
    return len(rows)


def _records(path: Path) -> list[tuple[int, RecordHeader]]:
    """``(offset, header)`` of each record that verifies, from the segment's start."""
    found = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset + HEADER_BYTES <= size:
            try:
                header = RecordHeader.unpack(pread_exact(fd, HEADER_BYTES, offset))
                end = offset + HEADER_BYTES + header.stored_bytes
                if end > size:
                    break
                payload = pread_exact(fd, header.stored_bytes, offset + HEADER_BYTES)
            except (CorruptBlockError, OSError):
                break
            if checksum(payload) != header.checksum:
                break
            found.append((offset, header))
            offset = end
    finally:
        os.close(fd)
    return found
