"""Where bytes live: memory, local disk, and shared tiers by URL below them.

Every tier outside memory stores blocks as records (``_record.py``): a 64-byte header
with the key, sizes, codec, expiry and a checksum, then the payload.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from kvtier.config import Config
from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.tiers.disk import DiskStats, DiskTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.remote import Guarded, open_remote

__all__ = ["DiskTier", "LocalTier", "MemoryTier", "Tiers", "open_tiers"]


class LocalTier(Protocol):
    """What the store needs of its disk tier: a :class:`DiskTier`, or a wrapper of
    one (:class:`kvtier.chaos.faults.FaultyTier` injects faults into it)."""

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        """Stores blocks; per item whether it is stored."""

    def read_into(self, key: BlockKey, out: Any, now: float | None = None) -> bool:
        """Reads a verified block into ``out``; ``False`` on a miss."""

    def delete(self, keys: Iterable[BlockKey]) -> int:
        """Removes blocks; how many were stored."""

    def entries(self) -> Iterator[tuple[BlockKey, BlockMeta]]:
        """Every block with its meta, oldest write first."""

    def stats(self) -> DiskStats: ...

    def close(self) -> None: ...


Tiers = tuple[MemoryTier, LocalTier | None, list[Guarded]]
"""Memory, the disk tier (if any), and the remote tiers, in order."""


def open_tiers(config: Config) -> tuple[MemoryTier, DiskTier | None, list[Guarded]]:
    """The tiers ``config`` asks for: memory always, disk when enabled, then every
    remote tier of ``remote.urls``, in order (named uniquely: redis, redis2, ...).

    Raises:
        ConfigError: A remote URL is not usable.
        StorageError: A directory cannot be created or opened.
    """
    memory = MemoryTier(
        config.memory.capacity_bytes,
        slab_bytes=config.memory.slab_bytes,
        shared=config.memory.shared,
        huge_pages=config.memory.huge_pages,
    )
    disk = None
    if config.disk.enabled:
        disk = DiskTier(
            config.disk_path,
            capacity_bytes=config.disk.capacity_bytes,
            segment_bytes=config.disk.segment_bytes,
            fsync=config.disk.fsync,
            compression=config.disk.compression,
        )
    remotes = []
    seen: dict[str, int] = {}
    for url in config.remote.urls:
        remote = open_remote(
            url,
            compression=config.remote.compression,
            retry_after=config.remote.retry_after,
        )
        seen[remote.name] = seen.get(remote.name, 0) + 1
        if seen[remote.name] > 1:
            remote.name = f"{remote.name}{seen[remote.name]}"
        remotes.append(remote)
    return memory, disk, remotes
