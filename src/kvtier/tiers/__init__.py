"""Where bytes live: memory, local disk, and shared tiers by URL below them.

Every tier outside memory stores blocks as records (``_record.py``): a 64-byte header
with the key, sizes, codec, expiry and a checksum, then the payload.
"""

from __future__ import annotations

from kvtier.config import Config
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.remote import Guarded, open_remote

__all__ = ["DiskTier", "MemoryTier", "open_tiers"]


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
