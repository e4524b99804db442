"""An asyncio etcd v3 client with failover, retries, resumable watches and leases.

Built on aetcd (gRPC). aetcd takes one target, so every endpoint goes into one gRPC
multi-address target (``ipv4:h1:p1,h2:p2,...``) with the round-robin policy: calls
spread over the members and a dead member's subchannel is skipped. On top of it:

* every call is retried, with short per-call timeouts and backoff, while its deadline
  lasts: a put sent while the cluster elects a new leader waits for it (measured here:
  about 1 s after SIGKILL of the leader);
* :meth:`Etcd.watch` re-creates a broken watch from the last revision it delivered, so
  no event is missed or delivered twice; if that revision was compacted away it says
  so (``resync``) and the caller reloads;
* :class:`KeptLease` refreshes a lease every third of its TTL and, if etcd lost it
  (expired while the node was partitioned), grants a new one and lets the owner
  re-register.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd

from kvtier.errors import ClusterError

__all__ = ["Etcd", "KeptLease", "WatchEvent"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_RETRYABLE = (
    aetcd.ConnectionFailedError,
    aetcd.ConnectionTimeoutError,
    aetcd.InternalError,
)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change under a watched prefix; ``value`` is ``None`` for a delete.

    ``resync`` marks the event that follows a watch which could not resume (its
    revision was compacted): the watcher must reload the prefix.
    """

    key: bytes
    value: bytes | None
    revision: int
    resync: bool = False


class Etcd:
    """A connection to an etcd cluster. ``await connect()`` first.

    Args:
        endpoints: ``host:port`` of every member (any subset works).
        call_timeout: Seconds one call may take before it is retried.
        deadline: Seconds a call keeps retrying before it fails.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        call_timeout: float = 0.5,
        deadline: float = 10.0,
    ) -> None:
        if not endpoints:
            raise ClusterError("no etcd endpoints given")
        self.endpoints = list(endpoints)
        self.call_timeout = call_timeout
        self.deadline = deadline
        target = "ipv4:" + ",".join(e.removeprefix("http://") for e in endpoints)
        host, port = target.rsplit(":", 1)
        self._client = aetcd.Client(
            host=host,
            port=int(port),
            timeout=call_timeout,
            options={"grpc.lb_policy_name": "round_robin"},
        )

    async def connect(self) -> None:
        try:
            await self._client.connect()
        except Exception as exc:
            raise ClusterError(f"cannot reach etcd at {self.endpoints}: {exc}") from exc

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    async def _retry(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        deadline = time.monotonic() + self.deadline
        delay = 0.05
        while True:
            try:
                return await call()
            except _RETRYABLE as exc:
                if time.monotonic() + delay > deadline:
                    raise ClusterError(f"etcd {what} failed: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def put(self, key: bytes, value: bytes, lease: Any = None) -> None:
        await self._retry("put", lambda: self._client.put(key, value, lease=lease))

    async def get(self, key: bytes) -> bytes | None:
        result = await self._retry("get", lambda: self._client.get(key))
        return None if result is None else bytes(result.value)

    async def delete(self, key: bytes) -> None:
        await self._retry("delete", lambda: self._client.delete(key))

    async def put_if_absent(self, key: bytes, value: bytes) -> bool:
        """Puts ``key`` only if it does not exist (one transaction); True if it did."""
        tx = self._client.transactions

        async def attempt() -> bool:
            succeeded, _ = await self._client.transaction(
                compare=[tx.version(key) == 0], success=[tx.put(key, value)], failure=[]
            )
            return bool(succeeded)

        return await self._retry("put_if_absent", attempt)

    async def get_prefix(self, prefix: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
        """Every key under ``prefix`` and the store revision they were read at."""
        result = await self._retry(
            "get_prefix", lambda: self._client.get_prefix(prefix)
        )
        items = [(bytes(kv.key), bytes(kv.value)) for kv in result]
        return items, int(result.header.revision)

    async def grant(self, ttl: int) -> Any:
        return await self._retry("lease grant", lambda: self._client.lease(ttl))

    async def revoke(self, lease: Any) -> None:
        with contextlib.suppress(Exception):
            await lease.revoke()

    async def watch(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` from ``start_revision`` on, forever, in order.

        A watch that breaks is re-created from the revision after the last event it
        delivered: nothing is missed or repeated.
        """
        next_revision = start_revision
        while True:
            try:
                watcher = await self._client.watch_prefix(
                    prefix, start_revision=next_revision
                )
                async for event in watcher:
                    revision = int(event.kv.mod_revision)
                    if revision < next_revision:
                        continue  # already delivered before a reconnect
                    next_revision = revision + 1
                    deleted = event.kind == aetcd.EventKind.DELETE
                    value = None if deleted else bytes(event.kv.value)
                    yield WatchEvent(bytes(event.kv.key), value, revision)
            except aetcd.RevisionCompactedError:
                _, next_revision = await self.get_prefix(prefix)
                next_revision += 1
                yield WatchEvent(b"", None, next_revision - 1, resync=True)
            except (*_RETRYABLE, aetcd.WatchTimeoutError) as exc:
                log.info("etcd watch on %r broke (%s): resuming", prefix, exc)
                await asyncio.sleep(0.1)


class KeptLease:
    """A lease refreshed every TTL/3; lost leases are re-granted.

    Args:
        etcd: The connection.
        ttl: Seconds the lease lives without a refresh.
        on_new_lease: Called with each new lease after the first (to re-put keys).
    """

    def __init__(
        self,
        etcd: Etcd,
        ttl: int,
        on_new_lease: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.on_new_lease = on_new_lease
        self.lease: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Any:
        self.lease = await self.etcd.grant(self.ttl)
        self._task = asyncio.create_task(self._keep())
        return self.lease

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                response = await self.lease.refresh()
                if int(getattr(response, "TTL", 1)) > 0:
                    continue
            except _RETRYABLE as exc:
                log.info("lease refresh failed (%s): etcd unreachable", exc)
                continue  # the lease may still live: try again next round
            except Exception as exc:  # noqa: BLE001 - e.g. lease not found
                log.info("lease refresh refused (%s)", exc)
            await self._replace()

    async def _replace(self) -> None:
        log.warning("etcd lease expired: registering again")
        try:
            self.lease = await self.etcd.grant(self.ttl)
            await self.on_new_lease(self.lease)
        except ClusterError as exc:
            log.warning("re-registration failed: %s", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.lease is not None:
            await self.etcd.revoke(self.lease)
