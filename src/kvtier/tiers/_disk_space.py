"""Room on the disk tier: which blocks a write batch stores, and a full filesystem.

A batch stores only blocks that are new (or expired), encoded into records whose
sizes decide what fits in ``capacity_bytes`` (:func:`fit`). Independently the
filesystem may be full: after ``ENOSPC``, ``EDQUOT`` or ``EFBIG`` the tier refuses
writes without touching the disk until space is freed or ``retry_s`` pass
(:class:`DiskSpace`), so a full disk costs a refused write, not a failed syscall per
block.

Deleting needs SQLite to append to its WAL, and deleting is how space comes back. So
the tier keeps a small preallocated file, ``reserve``, gives it up when a delete's
commit finds the disk full, and takes it again once space comes back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kvtier.core.index import BlockMeta
from kvtier.core.keys import KEY_BYTES, BlockKey, key_hex
from kvtier.errors import KeyFormatError, LayoutError
from kvtier.layout import Codec, as_block_array
from kvtier.tiers._disk_index import Loc
from kvtier.tiers._record import HEADER_BYTES, RecordHeader, encode

__all__ = ["DiskSpace", "Pending", "encode_pending", "fit", "fresh_items"]

logger = logging.getLogger(__name__)

# The reserve is capacity / 256, within these bounds: enough WAL for a delete.
RESERVE_MIN_BYTES = 64 * 1024
RESERVE_MAX_BYTES = 2**20


class Pending(NamedTuple):
    """A block of a write batch, encoded, not yet placed."""

    position: int  # in the batch
    key: BlockKey
    meta: BlockMeta
    header: RecordHeader
    buffers: list[Any]  # packed header, stored payload
    record_bytes: int


def fresh_items(
    items: Sequence[tuple[BlockKey, Any, BlockMeta]], locs: dict[bytes, Loc], now: float
) -> tuple[list[int], dict[int, int]]:
    """Positions of the items to store, and of repeated keys -> their first.

    An item is stored when its key is not in ``locs`` or has expired there.

    Raises:
        KeyFormatError: A key is not 16 bytes.
    """
    fresh: list[int] = []
    first_seen: dict[bytes, int] = {}
    repeats: dict[int, int] = {}
    for position, (key, _, _) in enumerate(items):
        if len(key) != KEY_BYTES:
            raise KeyFormatError(f"a block key is {KEY_BYTES} bytes, got {key!r}")
        if key in first_seen:
            repeats[position] = first_seen[key]
            continue
        first_seen[key] = position
        loc = locs.get(key)
        if loc is None or loc.expire_at <= now:
            fresh.append(position)
    return fresh, repeats


def encode_pending(
    position: int, key: BlockKey, block: Any, meta: BlockMeta, codec: Codec
) -> Pending:
    """The record of one item (a non-contiguous block is copied once).

    Raises:
        LayoutError: The block is not ``meta.nbytes`` bytes.
    """
    arr = as_block_array(block)
    payload = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
    if payload.nbytes != meta.nbytes:
        raise LayoutError(
            f"block {key_hex(key)} has {payload.nbytes} bytes, meta.nbytes says "
            f"{meta.nbytes}"
        )
    expire_at = meta.expire_at if math.isfinite(meta.expire_at) else 0.0
    header, stored = encode(key, payload, codec, expire_at)
    record_bytes = HEADER_BYTES + header.stored_bytes
    return Pending(position, key, meta, header, [header.pack(), stored], record_bytes)


def fit(pending: list[Pending], free_bytes: int) -> tuple[list[Pending], list[Pending]]:
    """The items that fit in ``free_bytes``, in order, and the others."""
    admitted, refused = [], []
    for item in pending:
        if item.record_bytes <= free_bytes:
            admitted.append(item)
            free_bytes -= item.record_bytes
        else:
            refused.append(item)
    return admitted, refused


class DiskSpace:
    """Whether the filesystem said it is full, and the reserve for deletes.

    After a space error writes wait until :meth:`note_freed` (a file was unlinked)
    or ``retry_s`` pass. The reserve is a file of ``capacity / 256`` bytes (64 KiB to
    1 MiB, enough WAL for a delete), given up only to let a delete commit on a full
    disk and taken again once space comes back. Changed only under the tier's write
    lock; :attr:`full` may be read anywhere.
    """

    def __init__(self, root: Path, capacity_bytes: int, retry_s: float) -> None:
        self._root = root
        self._retry_s = retry_s
        self._since: float | None = None  # time.monotonic() of the last space error
        self._reserve_path = root / "reserve"
        self._reserve_bytes = min(
            RESERVE_MAX_BYTES, max(RESERVE_MIN_BYTES, capacity_bytes // 256)
        )
        self._reserve_held = False

    @property
    def full(self) -> bool:
        return self._since is not None

    def refusing(self) -> bool:
        """Whether writes should be refused without touching the disk."""
        since = self._since
        return since is not None and time.monotonic() - since < self._retry_s

    def note_full(self, exc: Exception) -> None:
        was_full = self._since is not None
        self._since = time.monotonic()
        if not was_full:
            logger.warning(
                "disk tier %s is full (%s); refusing writes until space is freed or "
                "%.0f s pass",
                self._root,
                exc,
                self._retry_s,
            )

    def note_written(self) -> None:
        """A write went through: the filesystem has room again."""
        self._since = None

    def note_freed(self) -> None:
        """A file was unlinked: real space came back, for writes and the reserve."""
        self._since = None
        self.hold_reserve()

    def hold_reserve(self) -> None:
        """Takes the reserve if not held; quietly stays without while space is short."""
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

    def release_reserve(self) -> bool:
        """Frees the reserve's space; whether there was any to free."""
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
