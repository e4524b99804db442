"""The POSIX file I/O both file tiers share: exact reads, whole writes, publishing.

The disk tier (records in segment files) and the shared-FS tier (a record per file)
both read a record at an offset straight into the caller's buffers, write a record's
buffers without joining them, and must tell two kinds of ``OSError`` from real
failures: a full disk (a refused write, not an error) and a file that is not there (a
miss). These helpers do that once; what an outcome *means* (a miss, a full tier, a
quarantine) stays with the tier.

Everything here raises :class:`OSError` as the system did, but for two mappings: a
file that ends before the record does is :class:`~kvtier.errors.CorruptBlockError`
(the file is damaged, not the device), and a directory that cannot be listed is
:class:`~kvtier.errors.StorageError`. The ``*_quietly`` helpers never raise: they run
where the outcome is already decided, and log instead.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from typing import Any, Final

from kvtier.errors import CorruptBlockError, LayoutError, StorageError

__all__ = [
    "IOV_MAX",
    "close_quietly",
    "dest_view",
    "fsync_dir",
    "is_gone",
    "is_space_error",
    "link_no_clobber",
    "list_dir",
    "pread_exact",
    "preadv_exact",
    "pwritev_all",
    "pwritev_until_error",
    "same_file",
    "unlink_if_present",
    "unlink_quietly",
]

logger = logging.getLogger(__name__)

IOV_MAX: Final = 1024
"""Linux's limit on the buffers of one ``preadv`` / ``pwritev``."""

# A write refused for lack of space: a full tier, not a broken one.
_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_SQLITE_FULL: Final = 13  # SQLite reports a full disk as its own code, not an errno
# "The file is not (or no longer) there": a miss, not a failure. ESTALE is NFS's word
# for a file another node deleted; ENOTDIR, a fan-out directory replaced meanwhile.
_GONE_ERRNOS: Final = frozenset({errno.ENOENT, errno.ESTALE, errno.ENOTDIR})
# link(2) on a filesystem without hard links: the caller falls back to rename.
_NO_HARD_LINKS: Final = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}
)


def is_space_error(exc: BaseException) -> bool:
    """Whether ``exc`` (an ``OSError`` or a ``sqlite3.Error``) says the disk is full."""
    if isinstance(exc, OSError):
        return exc.errno in _SPACE_ERRNOS
    return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL


def is_gone(exc: OSError) -> bool:
    """Whether ``exc`` says the file (or a directory on its path) is not there."""
    return exc.errno in _GONE_ERRNOS


# -- reading ---------------------------------------------------------------------------


def dest_view(out: Any) -> memoryview:
    """``out`` as a writable byte view, for a read to land in without a copy.

    Raises:
        LayoutError: ``out`` is not C-contiguous, or it is read-only.
    """
    try:
        view = memoryview(out).cast("B")
    except TypeError as exc:
        raise LayoutError("read_into needs a C-contiguous destination") from exc
    if view.readonly:
        raise LayoutError("read_into needs a writable destination")
    return view


def preadv_exact(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Fills ``views``, in order, from ``offset`` of ``fd``.

    Raises:
        CorruptBlockError: The file ends before the views are full.
        OSError: The read failed.
    """
    rest = [memoryview(view).cast("B") for view in views]
    total = sum(view.nbytes for view in rest)
    done = 0
    while done < total:
        num_read = os.preadv(fd, rest, offset + done)
        if num_read == 0:
            raise CorruptBlockError(f"file ends {total - done} bytes short")
        done += num_read
        rest = _skip(rest, num_read)


def pread_exact(fd: int, nbytes: int, offset: int) -> memoryview:
    """``nbytes`` read from ``offset`` of ``fd`` into a new buffer (raises as above)."""
    buffer = memoryview(bytearray(nbytes))
    preadv_exact(fd, [buffer], offset)
    return buffer


# -- writing ---------------------------------------------------------------------------


def pwritev_until_error(
    fd: int, buffers: Sequence[Any], offset: int
) -> tuple[int, OSError | None]:
    """Writes ``buffers`` back to back at ``offset``, until done or an error.

    Returns:
        The bytes written, and the error that stopped the write (``None`` when all
        were written). A caller that packs several records into one write needs the
        count to know which of them landed whole.
    """
    rest = [memoryview(buffer).cast("B") for buffer in buffers]
    total = sum(view.nbytes for view in rest)
    done = 0
    try:
        while done < total:
            num_written = os.pwritev(fd, rest, offset + done)
            if num_written == 0:  # a regular file only stalls when it cannot grow
                return done, OSError(errno.ENOSPC, "write made no progress")
            done += num_written
            rest = _skip(rest, num_written)
    except OSError as exc:
        return done, exc
    return done, None


def pwritev_all(fd: int, buffers: Sequence[Any], offset: int) -> None:
    """Writes ``buffers`` back to back at ``offset``, or raises the ``OSError``."""
    _, error = pwritev_until_error(fd, buffers, offset)
    if error is not None:
        raise error


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


# -- names and directories -------------------------------------------------------------


def link_no_clobber(src: str, dst: str) -> bool:
    """Links ``src`` at ``dst`` unless ``dst`` exists; ``False``: no hard links here.

    An existing ``dst`` counts as success: blocks are content-addressed, so whoever
    got there first stored the same bytes.
    """
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        return False
    return True


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes the directory's entries (new names, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # no directory fsync here
            raise
    finally:
        os.close(fd)


def same_file(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (``False`` if gone)."""
    try:
        st_path, st_fd = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st_path.st_dev, st_path.st_ino) == (st_fd.st_dev, st_fd.st_ino)


def list_dir(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    """The entries of a directory; none when it is not there.

    Raises:
        StorageError: The directory exists but cannot be listed.
    """
    try:
        with os.scandir(os.fspath(path)) as entries:
            return list(entries)
    except OSError as exc:
        if is_gone(exc):
            return []
        raise StorageError(f"cannot list directory {path}: {exc}") from exc


def unlink_if_present(path: str | os.PathLike[str]) -> bool:
    """Deletes ``path``; ``False`` if it was not there. Other errors raise."""
    try:
        os.unlink(path)
    except OSError as exc:
        if not is_gone(exc):
            raise
        return False
    return True


def unlink_quietly(path: str | os.PathLike[str]) -> bool:
    """Deletes ``path``; ``False`` if it was not there or could not go (logged)."""
    try:
        return unlink_if_present(path)
    except OSError as exc:
        logger.warning("cannot delete %s: %s", path, exc)
        return False


def close_quietly(fd: int) -> None:
    """Closes ``fd``, logging a failure.

    Only for descriptors with nothing left to lose: read-only ones, or written ones
    already synced or never promised to be durable. A writer that relies on close to
    report a deferred error (NFS) must call ``os.close`` itself.
    """
    try:
        os.close(fd)
    except OSError as exc:
        logger.warning("closing a file: %s", exc)
