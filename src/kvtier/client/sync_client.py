"""``kvtier.Client``: the asyncio client behind a blocking facade.

The facade drives an :class:`~kvtier.client.AsyncClient` on a private event loop, run
in the calling thread for the length of each call: there is one implementation of the
protocol, not a blocking twin, and no hand-off to another thread (two wake-ups per call,
which cost more than a whole request on a busy host). As nothing else runs on that
loop, :class:`Client` lets its requests wait for the socket on the calling thread
(``AsyncClient.wait_on_calling_thread``) instead of through the loop's selector.
Calls from several threads are serialized by a lock; inside ``async`` code use
``AsyncClient`` instead. Every method of ``AsyncClient`` exists here with the same
arguments, returning instead of awaiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar

import numpy as np

from kvtier.client.async_client import AsyncClient, RemoteLease, RemoteReservation
from kvtier.core.keys import BlockKey
from kvtier.layout import KVLayout
from kvtier.results import BlockInfo, Match, PutResult

if TYPE_CHECKING:
    from kvtier.client.cluster import AsyncClusterClient

__all__ = ["Client", "ClusterClient"]

_T = TypeVar("_T")


class _Facade:
    """Blocking calls over an async client object, run on a private loop.

    With ``background=False`` the loop runs in the calling thread during each call
    (no hand-off); with ``True`` it runs all the time in a daemon thread, for clients
    that must keep working between calls (following a cluster's membership).
    """

    aio: AsyncClient | AsyncClusterClient

    def __init__(self, make: Callable[[], Any], *, background: bool = False) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="kvtier-client", daemon=True
            )
            self._thread.start()
        try:
            self.aio = make()
            self._run(self.aio.connect())
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._thread is not None:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        with self._lock:
            return self._loop.run_until_complete(coro)

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

    def get_blocks(self, keys: Sequence[BlockKey]) -> list[np.ndarray[Any, Any] | None]:
        return self._run(self.aio.get_blocks(keys))

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

    def finish(self, keys: Sequence[BlockKey]) -> None:
        self._run(self.aio.finish(keys))

    def stats(self) -> dict[str, Any]:
        return self._run(self.aio.stats())

    def ping(self) -> None:
        self._run(self.aio.ping())

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
            if self._thread is not None:
                asyncio.run_coroutine_threadsafe(_cancel_pending(), loop).result()
                loop.call_soon_threadsafe(loop.stop)
                self._thread.join()
            else:
                loop.run_until_complete(_cancel_pending())
        finally:
            loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(_Facade):
    """A blocking client of one kvtier node; arguments as :class:`AsyncClient`.

    ``with Client("127.0.0.1:7480") as client: client.put(keys, blocks)``.
    """

    aio: AsyncClient

    def __init__(self, address: str = "127.0.0.1:7480", **options: Any) -> None:
        def make() -> AsyncClient:
            client = AsyncClient(address, **options)
            client.wait_on_calling_thread()  # its loop runs only inside our calls
            return client

        super().__init__(make)

    @property
    def shared_memory(self) -> bool:
        return self.aio.shared_memory

    @property
    def node_info(self) -> dict[str, Any]:
        return self.aio.node_info

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


class ClusterClient(_Facade):
    """A blocking client of a whole cluster; arguments as :class:`AsyncClusterClient`.

    ``with ClusterClient("etcd-host:2379", "prod") as client: client.get(keys)``.
    """

    aio: AsyncClusterClient

    def __init__(self, etcd: Sequence[str] | str, cluster: str, **options: Any) -> None:
        from kvtier.client.cluster import AsyncClusterClient

        super().__init__(
            lambda: AsyncClusterClient(etcd, cluster, **options), background=True
        )

    @property
    def nodes(self) -> list[str]:
        return self.aio.nodes


async def _cancel_pending() -> None:
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(0)  # transports finish closing in callbacks
