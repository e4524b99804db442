"""``kvtier.Client``: the asyncio client behind a blocking facade.

The facade drives an :class:`~kvtier.client.AsyncClient` on a private event loop, run
in the calling thread for the length of each call: there is one implementation of the
protocol, not a blocking twin, and no hand-off to another thread (two wake-ups per call,
which cost more than a whole request on a busy host). Calls from several threads are
serialized by a lock; inside ``async`` code use ``AsyncClient`` instead. Every method of
``AsyncClient`` exists here with the same arguments, returning instead of awaiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from kvtier.client.async_client import AsyncClient, RemoteLease, RemoteReservation
from kvtier.core.keys import BlockKey
from kvtier.layout import KVLayout
from kvtier.results import BlockInfo, Match, PutResult

__all__ = ["Client"]

_T = TypeVar("_T")


class Client:
    """A blocking client of one kvtier node; arguments as :class:`AsyncClient`.

    ``with Client("127.0.0.1:7480") as client: client.put(keys, blocks)``.
    """

    def __init__(self, address: str = "127.0.0.1:7480", **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        try:
            self.aio = AsyncClient(address, **options)
            self._run(self.aio.connect())
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        with self._lock:
            return self._loop.run_until_complete(coro)

    @property
    def shared_memory(self) -> bool:
        return self.aio.shared_memory

    @property
    def node_info(self) -> dict[str, Any]:
        return self.aio.node_info

    def put(
        self,
        keys: Sequence[BlockKey],
        blocks: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> PutResult:
        return self._run(self.aio.put(keys, blocks, layout=layout))

    def get(
        self, keys: Sequence[BlockKey], *, layout: KVLayout | None = None
    ) -> list[np.ndarray[Any, Any]]:
        return self._run(self.aio.get(keys, layout=layout))

    def get_into(
        self,
        keys: Sequence[BlockKey],
        outs: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> int:
        return self._run(self.aio.get_into(keys, outs, layout=layout))

    def match(self, keys: Sequence[BlockKey], *, window: int | None = None) -> Match:
        return self._run(self.aio.match(keys, window=window))

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        return self._run(self.aio.contains(keys))

    def delete(self, keys: Sequence[BlockKey]) -> int:
        return self._run(self.aio.delete(keys))

    def list(
        self, group: str | None = None, limit: int | None = None
    ) -> list[BlockInfo]:
        return self._run(self.aio.list(group, limit))

    def prefetch(self, keys: Sequence[BlockKey]) -> int:
        return self._run(self.aio.prefetch(keys))

    def stats(self) -> dict[str, Any]:
        return self._run(self.aio.stats())

    def ping(self) -> None:
        self._run(self.aio.ping())

    def reserve(
        self,
        keys: Sequence[BlockKey],
        sizes: Sequence[int],
        *,
        timeout: float | None = None,
    ) -> RemoteReservation:
        return self._run(self.aio.reserve(keys, sizes, timeout=timeout))

    def commit(self, reservation: RemoteReservation) -> PutResult:
        return self._run(self.aio.commit(reservation))

    def abort(self, reservation: RemoteReservation) -> None:
        self._run(self.aio.abort(reservation))

    def lease(self, keys: Sequence[BlockKey]) -> RemoteLease:
        return self._run(self.aio.lease(keys))

    def release(self, lease: RemoteLease) -> None:
        self._run(self.aio.release(lease))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.aio.close())
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        """Runs what closing scheduled (transports close in callbacks), then closes."""
        loop = self._loop
        try:
            loop.run_until_complete(_cancel_pending())
        finally:
            loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_pending() -> None:
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(0)  # transports finish closing in callbacks
