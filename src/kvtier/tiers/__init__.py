"""Where bytes live: memory, local disk, a shared filesystem (more to come).

Every tier outside memory stores blocks as records (``_record.py``): a 64-byte header
with the key, sizes, codec, expiry and a checksum, then the payload.
"""

from __future__ import annotations

from kvtier.config import Config
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.shared_fs import SharedFSTier

__all__ = ["DiskTier", "MemoryTier", "SharedFSTier", "open_tiers"]


def open_tiers(
    config: Config,
) -> tuple[MemoryTier, DiskTier | None, SharedFSTier | None]:
    """The tiers ``config`` asks for: memory always, disk and shared FS when enabled.

    Raises:
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
    shared = None
    if config.shared_fs.path:
        shared = SharedFSTier(
            config.shared_fs.path,
            capacity_bytes=config.shared_fs.capacity_bytes,
            compression=config.shared_fs.compression,
            fsync=config.shared_fs.fsync,
            high_watermark=config.store.high_watermark,
            low_watermark=config.store.low_watermark,
        )
    return memory, disk, shared
