"""The asyncio face of the embedded store: the same calls, awaited.

Each call runs the synchronous implementation in a worker thread
(``asyncio.to_thread``), so the event loop never blocks on a copy or a disk read, and
there is one implementation of the store, not a sync and an async twin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.core.keys import BlockKey
from kvtier.results import BlockInfo, Match, PutResult, StoreStats
from kvtier.store import TieredStore

__all__ = ["AsyncTieredStore"]


class AsyncTieredStore:
    """Awaitable wrapper of a :class:`~kvtier.TieredStore` (``sync`` is the store)."""

    def __init__(self, store: TieredStore) -> None:
        self.sync = store

    async def put(
        self, keys: Sequence[BlockKey], blocks: Sequence[Any], **kwargs: Any
    ) -> PutResult:
        return await asyncio.to_thread(self.sync.put, keys, blocks, **kwargs)

    async def get(
        self, keys: Sequence[BlockKey], **kwargs: Any
    ) -> list[np.ndarray[Any, Any]]:
        return await asyncio.to_thread(self.sync.get, keys, **kwargs)

    async def get_into(
        self, keys: Sequence[BlockKey], outs: Sequence[Any], **kwargs: Any
    ) -> int:
        return await asyncio.to_thread(self.sync.get_into, keys, outs, **kwargs)

    async def match(self, keys: Sequence[BlockKey], **kwargs: Any) -> Match:
        return await asyncio.to_thread(self.sync.match, keys, **kwargs)

    async def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        return await asyncio.to_thread(self.sync.contains, keys)

    async def delete(self, keys: Sequence[BlockKey]) -> int:
        return await asyncio.to_thread(self.sync.delete, keys)

    async def list(
        self, group: str | None = None, limit: int | None = None
    ) -> list[BlockInfo]:
        return await asyncio.to_thread(self.sync.list, group, limit)

    async def prefetch(self, keys: Sequence[BlockKey]) -> int:
        return await asyncio.wrap_future(self.sync.prefetch(keys))

    async def stats(self) -> StoreStats:
        return await asyncio.to_thread(self.sync.stats)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncTieredStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
