"""A tier wrapper that injects EIO, ENOSPC, latency and torn writes into a real tier.

:class:`FaultyTier` wraps a real :class:`~kvtier.tiers.disk.DiskTier` (in the store's
disk slot) or a real remote tier such as
:class:`~kvtier.tiers.shared_fs.SharedFSTier` (inside its health guard), and passes
every call through to it, but, as its :class:`FaultPlan` says:

* ``eio``: a read or a write fails with ``OSError(EIO)`` before reaching the tier, as
  from a failing device;
* ``enospc``: a write fails with ``OSError(ENOSPC)``, as from a full filesystem;
* ``latency_s``: every call waits that long first, as on a slow or remote disk;
* ``torn``: a write goes through, then the tail of the block's record is zeroed in the
  real file, as when power fails after the index commit but before the data pages
  reach the disk. The tier's own read path must catch it (checksums).

The plan can change while the store runs (faults start and end), and the wrapper counts
what it injected. Why wrap the tier and not the syscalls: the tiers do their I/O in
several modules through ``os``; patching ``os`` would touch every thread of the
process, while a wrapper is scoped to one tier and needs no help from the tier. The one
thing it needs is where a record lives, to tear it: ``locate(key)``, which both
file tiers answer.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kvtier.config import Config
from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.tiers import Tiers, open_tiers
from kvtier.tiers.remote import Guarded

__all__ = ["FaultPlan", "FaultyTier", "faulty_tiers"]


@dataclass
class FaultPlan:
    """What to inject, changeable at any time. Chances are per call (per block for
    ``torn``).

    Attributes:
        eio: Chance a read or write fails with EIO.
        enospc: Chance a write fails with ENOSPC.
        torn: Chance a block written is torn afterwards.
        latency_s: Seconds every call waits before it runs.
        seed: Seeds the dice.
    """

    eio: float = 0.0
    enospc: float = 0.0
    torn: float = 0.0
    latency_s: float = 0.0
    seed: int = 0

    def clear(self) -> None:
        """Ends every fault."""
        self.eio = self.enospc = self.torn = self.latency_s = 0.0


class _Locatable(Protocol):
    def locate(self, key: BlockKey) -> tuple[Path, int, int] | None: ...


class FaultyTier:
    """A real tier, with the faults of ``plan`` injected. Thread-safe.

    Attributes:
        inner: The wrapped tier.
        injected: How many of each fault were injected (``eio``, ``enospc``,
            ``torn``, ``latency``).
    """

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.name: str = inner.name
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()

    # -- the dice ---------------------------------------------------------------------

    def _roll(self, chance: float) -> bool:
        with self._lock:
            return chance > 0 and self._rng.random() < chance

    def _count(self, fault: str, n: int = 1) -> None:
        with self._lock:
            self.injected[fault] += n

    def _before(self, *, write: bool) -> None:
        plan = self.plan
        if plan.latency_s > 0:
            self._count("latency")
            time.sleep(plan.latency_s)
        if self._roll(plan.eio):
            self._count("eio")
            raise OSError(errno.EIO, "injected I/O error")
        if write and self._roll(plan.enospc):
            self._count("enospc")
            raise OSError(errno.ENOSPC, "injected: no space left on device")

    # -- writes -----------------------------------------------------------------------

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        self._before(write=True)
        # Only a block this call writes can be torn by it: one stored already (a
        # repeated put answers True without writing) is left alone.
        inner: _Locatable = self.inner
        tearable = {k for k, _, _ in items if self.plan.torn and not inner.locate(k)}
        stored: list[bool] = self.inner.write(items)
        for (key, _, _), ok in zip(items, stored, strict=True):
            if (
                ok
                and key in tearable
                and self._roll(self.plan.torn)
                and self._tear(key)
            ):
                self._count("torn")
        return stored

    def _tear(self, key: BlockKey) -> bool:
        """Zeroes the second half of the block's record in its file."""
        inner: _Locatable = self.inner
        where = inner.locate(key)
        if where is None:
            return False
        path, offset, nbytes = where
        half = nbytes // 2
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, bytes(nbytes - half), offset + half)
        finally:
            os.close(fd)
        return True

    def delete(self, keys: Iterable[BlockKey]) -> int:
        removed: int = self.inner.delete(list(keys))
        return removed

    # -- reads ------------------------------------------------------------------------

    def read_into(self, key: BlockKey, out: Any, now: float | None = None) -> bool:
        self._before(write=False)
        found: bool = self.inner.read_into(key, out, now)
        return found

    def get(
        self, key: BlockKey, now: float | None = None
    ) -> np.ndarray[Any, Any] | None:
        self._before(write=False)
        block: np.ndarray[Any, Any] | None = self.inner.get(key, now)
        return block

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        self._before(write=False)
        present: list[bool] = self.inner.contains(keys)
        return present

    def entries(self) -> Iterator[tuple[BlockKey, BlockMeta]]:
        entries: Iterator[tuple[BlockKey, BlockMeta]] = self.inner.entries()
        return entries

    def stats(self) -> Any:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def faulty_tiers(config: Config, plan: FaultPlan) -> tuple[Tiers, list[FaultyTier]]:
    """The tiers ``config`` asks for, the disk and every remote one wrapped in a
    :class:`FaultyTier` sharing ``plan``: pass the first to ``TieredStore(tiers=)``.

    Returns:
        The tiers, and the wrappers (to read what they injected).
    """
    memory, disk, remotes = open_tiers(config)
    wrappers = []
    faulty_disk = None
    if disk is not None:
        faulty_disk = FaultyTier(disk, plan)
        wrappers.append(faulty_disk)
    guarded = []
    for remote in remotes:
        wrapper = FaultyTier(remote.tier, plan)
        wrappers.append(wrapper)
        guarded.append(Guarded(wrapper, retry_after=remote.retry_after))
        guarded[-1].name = remote.name  # redis2, ... as open_tiers named it
    return (memory, faulty_disk, guarded), wrappers
