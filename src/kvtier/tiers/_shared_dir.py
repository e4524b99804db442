"""The shared-FS tier's directory: where block files live, publishing, verifying.

Layout under the root directory::

    blocks/<h0h1>/<h2h3>/<keyhex>.kvb   one file per block: record header + payload
    tmp/<host>-<pid>-<random>.part      blocks being written (same filesystem)
    quarantine/<keyhex>.kvb.<suffix>    corrupt files moved aside for inspection

Two levels of fan-out keep directories small. Fan-out directories are created on
demand and never removed, so a writer never races a sweeper that would delete the
directory it links into. Temporary and quarantine names carry the host and pid, so
nodes sharing the directory never collide.

A block file is exactly one record (:mod:`kvtier.tiers._record`): a file of any other
size, or whose header names another key, is corrupt (:func:`header_of`).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from kvtier.core.keys import KEY_BYTES, BlockKey
from kvtier.errors import CorruptBlockError, KeyFormatError, StorageError
from kvtier.tiers._fsio import (
    close_quietly,
    fsync_dir,
    is_gone,
    link_no_clobber,
    list_dir,
    pread_exact,
    preadv_exact,
    pwritev_all,
    unlink_if_present,
    unlink_quietly,
)
from kvtier.tiers._record import HEADER_BYTES, RecordHeader, decode_into

__all__ = [
    "STALE_PART_S",
    "BlockDir",
    "expired",
    "header_of",
    "open_block",
    "read_payload",
]

log = logging.getLogger(__name__)

STALE_PART_S: Final = 3600.0
"""A ``.part`` file older than this belongs to a crashed writer; sweep removes it."""

_BLOCK_SUFFIX: Final = ".kvb"
_PART_SUFFIX: Final = ".part"
_HOST: Final = socket.gethostname().replace(os.sep, "_") or "host"


class BlockDir:
    """The files of one shared-FS tier directory. Stateless beyond its paths.

    Raises:
        StorageError: The directories cannot be created.
    """

    def __init__(self, root: Path, *, fsync: bool) -> None:
        self._fsync = fsync
        self._blocks_dir = os.path.join(root, "blocks")
        self._tmp_dir = os.path.join(root, "tmp")
        self._quarantine_dir = os.path.join(root, "quarantine")
        for directory in (self._blocks_dir, self._tmp_dir, self._quarantine_dir):
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"cannot create shared-FS tier directory {directory}: {exc}"
                ) from exc

    def block_path(self, key: BlockKey) -> str:
        """Where the block's file lives.

        Raises:
            KeyFormatError: ``key`` is not 16 bytes.
        """
        if len(key) != KEY_BYTES:
            raise KeyFormatError(f"a block key has {KEY_BYTES} bytes, got {len(key)}")
        h = key.hex()
        return os.path.join(self._blocks_dir, h[0:2], h[2:4], h + _BLOCK_SUFFIX)

    # -- publishing -------------------------------------------------------------------

    def publish(self, path: str, head: bytes, stored: Any, *, replace: bool) -> None:
        """Writes a record to ``tmp/``, then gives it the name ``path``, atomically.

        Without ``replace``, an existing file at ``path`` is kept (see
        :func:`~kvtier.tiers._fsio.link_no_clobber`), unless this filesystem has no
        hard links; then, as with ``replace``, the last rename wins.

        Raises:
            OSError: The write or the rename failed (nothing is left in ``tmp/``).
        """
        part = self._part_path()
        try:
            self._write_part(part, head, stored)
            self._rename(part, path, replace=replace)
        except OSError:
            unlink_quietly(part)
            raise

    def _write_part(self, part: str, head: bytes, stored: Any) -> None:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pwritev_all(fd, [head, stored], 0)
            if self._fsync:
                os.fsync(fd)
        finally:
            # On NFS a deferred write error (ENOSPC, EDQUOT) may first show up here,
            # so close's error must fail the write, not be swallowed.
            os.close(fd)

    def _rename(self, part: str, path: str, *, replace: bool) -> None:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        if replace or not link_no_clobber(part, path):
            os.replace(part, path)
        else:
            unlink_quietly(part)
        if self._fsync:
            fsync_dir(directory)

    def _part_path(self) -> str:
        name = f"{_HOST}-{os.getpid()}-{secrets.token_hex(8)}{_PART_SUFFIX}"
        return os.path.join(self._tmp_dir, name)

    # -- corrupt files ----------------------------------------------------------------

    def move_aside(self, path: str) -> bool:
        """Moves ``path`` to quarantine (or deletes it); ``False`` if both failed."""
        suffix = f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        target = os.path.join(
            self._quarantine_dir, f"{os.path.basename(path)}.{suffix}"
        )
        try:
            os.rename(path, target)
            return True
        except OSError as exc:
            if is_gone(exc):
                return True
            log.warning("shared_fs: cannot quarantine %s: %s", path, exc)
        try:
            unlink_if_present(path)
        except OSError as exc:
            log.error("shared_fs: cannot delete corrupt %s: %s", path, exc)
            return False
        return True

    def audit(self, path: str) -> str | None:
        """Why the file at ``path`` is bad, or ``None`` if it verifies (or vanished)."""
        key = _key_from_name(os.path.basename(path))
        if key is None:
            return "not a block file name"
        if path != self.block_path(key):
            return "block file in the wrong directory"
        try:
            fd = open_block(path)
        except CorruptBlockError as exc:
            return str(exc)
        except OSError as exc:
            return None if is_gone(exc) else f"cannot open: {exc}"
        try:
            header, _st = header_of(fd, key)
            read_payload(fd, header, memoryview(bytearray(header.raw_bytes)))
        except CorruptBlockError as exc:
            return str(exc)
        except OSError as exc:
            return None if is_gone(exc) else f"cannot read: {exc}"
        finally:
            close_quietly(fd)
        return None

    # -- walking the tree -------------------------------------------------------------

    def scan(self) -> Iterator[tuple[BlockKey, str]]:
        """``(key, path)`` of every file under ``blocks/`` named like a block.

        Raises:
            StorageError: A directory cannot be listed (raised while iterating).
        """
        for path in self.scan_files():
            key = _key_from_name(os.path.basename(path))
            if key is not None:
                yield key, path

    def scan_files(self) -> Iterator[str]:
        """Paths of everything under ``blocks/`` that is not one of its two levels of
        real directories (raises as above).

        Links and FIFOs count: kvtier never writes them, so someone planted them, and
        audits must set them aside. A link in place of a directory is never followed
        (it could lead an audit's fix, or a sweep, to move or delete files anywhere):
        it is listed itself, and moving it aside moves the link, not its target.
        """
        for top in list_dir(self._blocks_dir):
            if not top.is_dir(follow_symlinks=False):
                yield top.path
                continue
            for mid in list_dir(top.path):
                if not mid.is_dir(follow_symlinks=False):
                    yield mid.path
                    continue
                for entry in list_dir(mid.path):
                    if not entry.is_dir(follow_symlinks=False):
                        yield entry.path

    def stale_parts(self, now: float) -> list[str]:
        """``.part`` files older than :data:`STALE_PART_S` at ``now``."""
        stale = []
        for entry in list_dir(self._tmp_dir):
            if not entry.name.endswith(_PART_SUFFIX):
                continue
            try:
                mtime = entry.stat().st_mtime
            except OSError:
                continue  # finished (renamed) or removed meanwhile
            if now - mtime > STALE_PART_S:
                stale.append(entry.path)
        return stale


_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_block(path: str) -> int:
    """Opens a block file to read, never following a link nor waiting on a FIFO.

    Any node sharing the directory could plant either: a link could lead reads (and
    quarantine moves) out of the directory, and opening a FIFO waits for a writer
    forever. kvtier only ever publishes regular files, so both are corrupt blocks.

    Raises:
        CorruptBlockError: ``path`` is a symbolic link or not a regular file.
        OSError: It cannot be opened (absent, permissions, I/O).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptBlockError(f"{path} is a symbolic link") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptBlockError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def header_of(fd: int, key: BlockKey) -> tuple[RecordHeader, os.stat_result]:
    """The verified header of the open block file and its stat.

    Raises:
        CorruptBlockError: Bad header, another key's record, or a size that does not
            match the header (a torn or extended file).
    """
    st = os.fstat(fd)
    header = RecordHeader.unpack(pread_exact(fd, HEADER_BYTES, 0))
    if header.key != key:
        raise CorruptBlockError(f"file holds block {header.key.hex()}")
    expected = HEADER_BYTES + header.stored_bytes
    if st.st_size != expected:
        raise CorruptBlockError(f"file is {st.st_size} bytes, record is {expected}")
    return header, st


def read_payload(fd: int, header: RecordHeader, dest: memoryview) -> None:
    """Reads and verifies the payload into ``dest`` (straight in when uncompressed)."""
    if header.codec_id == 0 and header.stored_bytes == len(dest):
        preadv_exact(fd, [dest], HEADER_BYTES)
        decode_into(header, dest, dest)
    else:
        decode_into(header, pread_exact(fd, header.stored_bytes, HEADER_BYTES), dest)


def expired(expire_at: float, now: float) -> bool:
    """Whether a header's ``expire_at`` has passed at ``now``."""
    return expire_at != 0.0 and expire_at <= now  # 0.0 in a header: never


def _key_from_name(name: str) -> BlockKey | None:
    stem = name.removesuffix(_BLOCK_SUFFIX)
    if stem == name or len(stem) != 2 * KEY_BYTES:
        return None
    try:
        key = bytes.fromhex(stem)
    except ValueError:
        return None
    return BlockKey(key) if key.hex() == stem else None  # lowercase, canonical
