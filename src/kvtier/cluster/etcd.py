"""An asyncio etcd v3 client over etcd's JSON gateway: failover, retries, resumable
watches, kept leases.

etcd (3.4+) serves its whole v3 API as JSON over HTTP (``/v3/kv/range``,
``/v3/watch``...), which aiohttp speaks without gRPC. Why not a gRPC client (aetcd, the
first choice): grpc.aio binds a poller to one event loop, and kvtier's blocking cluster
client runs its own loop, so every client made and closed in a process left a poller
posting to a closed loop. The gateway has no such state, and needs no protobuf pin.

On top of the calls:

* every call goes to the member that answered last and, on a connection error, a
  timeout or an "unavailable" answer, moves to the next member and retries with
  backoff while its deadline lasts: a put sent while the cluster elects a new leader
  waits for it (about 0.3-1 s after SIGKILL of the leader here);
* :meth:`Etcd.watch` re-creates a broken watch from the revision after the last event
  it delivered, so no event is missed or delivered twice; if that revision was
  compacted away it says so (``resync``) and the caller reloads;
* :class:`KeptLease` refreshes a lease every third of its TTL and, if etcd lost it
  (expired while the node was partitioned), grants a new one and lets the owner
  re-register.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvtier.errors import ClusterError

__all__ = ["Etcd", "KeptLease", "WatchEvent"]

log = logging.getLogger(__name__)

_UNAVAILABLE = 14  # gRPC status code etcd returns while it has no leader


class _Retry(Exception):
    """A call failed in a way another member, or a moment later, may not."""


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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class Etcd:
    """A connection to an etcd cluster. ``await connect()`` first.

    Args:
        endpoints: ``host:port`` (or ``http://host:port``) of members; any subset.
        call_timeout: Seconds one call may take before another member is tried.
        deadline: Seconds a call keeps retrying before it fails.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        call_timeout: float = 1.0,
        deadline: float = 10.0,
    ) -> None:
        urls = [e.strip() for e in endpoints if e.strip()]
        if not urls:
            raise ClusterError("no etcd endpoints given")
        self.endpoints = [u if "://" in u else f"http://{u}" for u in urls]
        self.call_timeout = call_timeout
        self.deadline = deadline
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    async def connect(self) -> None:
        """Opens the session and checks that some member answers."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.call_timeout)
        )
        await self._call("/v3/maintenance/status", {})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + self.deadline
        delay = 0.05
        while True:
            endpoint = self.endpoints[self._current]
            try:
                return await self._post(endpoint + path, body)
            except _Retry as exc:
                self._current = (self._current + 1) % len(self.endpoints)
                if time.monotonic() + delay > deadline:
                    raise ClusterError(f"etcd {path} failed: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            raise ClusterError("the etcd client is not connected")
        try:
            async with self._session.post(
                url, json=body, timeout=aiohttp.ClientTimeout(total=self.call_timeout)
            ) as response:
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise _Retry(f"{url}: {exc!r}") from exc
        if not isinstance(answer, dict):
            raise _Retry(f"{url}: unexpected answer {answer!r}")
        if "error" in answer or "code" in answer and answer["code"]:
            if answer.get("code") == _UNAVAILABLE or response.status >= 500:
                raise _Retry(f"{url}: {answer.get('error') or answer}")
            raise ClusterError(f"etcd refused {url}: {answer.get('error') or answer}")
        return answer

    # ------------------------------------------------------------- keys

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        await self._call("/v3/kv/put", body)

    async def get(self, key: bytes) -> bytes | None:
        answer = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        return _unb64(kvs[0].get("value", "")) if kvs else None

    async def delete(self, key: bytes) -> None:
        await self._call("/v3/kv/deleterange", {"key": _b64(key)})

    async def put_if_absent(self, key: bytes, value: bytes) -> bool:
        """Puts ``key`` only if it does not exist (one transaction); True if it did."""
        answer = await self._call(
            "/v3/kv/txn",
            {
                "compare": [
                    {
                        "target": "VERSION",
                        "key": _b64(key),
                        "version": "0",
                        "result": "EQUAL",
                    }
                ],
                "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
            },
        )
        return bool(answer.get("succeeded", False))

    async def get_prefix(self, prefix: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
        """Every key under ``prefix`` and the store revision they were read at."""
        answer = await self._call(
            "/v3/kv/range",
            {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))},
        )
        items = [
            (_unb64(kv["key"]), _unb64(kv.get("value", "")))
            for kv in answer.get("kvs") or []
        ]
        return items, int(answer["header"]["revision"])

    # ------------------------------------------------------------- leases

    async def grant(self, ttl: int) -> int:
        answer = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def refresh(self, lease: int) -> int:
        """Keeps a lease alive; returns its remaining TTL (<= 0: it is gone)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", answer).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(ClusterError):
            await self._call("/v3/lease/revoke", {"ID": str(lease)})

    # ------------------------------------------------------------- watches

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
                async for result in self._watch_stream(prefix, next_revision):
                    compacted = int(result.get("compact_revision", 0) or 0)
                    if compacted:
                        _, next_revision = await self.get_prefix(prefix)
                        next_revision += 1
                        yield WatchEvent(b"", None, next_revision - 1, resync=True)
                        break
                    for event in result.get("events") or []:
                        watch_event = _event(event)
                        if watch_event.revision >= next_revision:
                            next_revision = watch_event.revision + 1
                            yield watch_event
            except (_Retry, ClusterError) as exc:
                log.info("etcd watch on %r broke (%s): resuming", prefix, exc)
            self._current = (self._current + 1) % len(self.endpoints)
            await asyncio.sleep(0.1)

    async def _watch_stream(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[dict[str, Any]]:
        """The ``result`` objects of one watch stream, until it ends or breaks."""
        if self._session is None:
            raise ClusterError("the etcd client is not connected")
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(_prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        url = self.endpoints[self._current] + "/v3/watch"
        try:
            async with self._session.post(url, json=body) as response:
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield json.loads(line).get("result", {})
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise _Retry(f"{url}: {exc!r}") from exc


def _event(event: dict[str, Any]) -> WatchEvent:
    kv = event.get("kv", {})
    deleted = event.get("type") == "DELETE"
    value = None if deleted else _unb64(kv.get("value", ""))
    return WatchEvent(_unb64(kv["key"]), value, int(kv.get("mod_revision", 0)))


class KeptLease:
    """A lease refreshed every TTL/3; lost leases are re-granted.

    Args:
        etcd: The connection.
        ttl: Seconds the lease lives without a refresh.
        on_new_lease: Called with each new lease after the first (to re-put keys).
    """

    def __init__(
        self, etcd: Etcd, ttl: int, on_new_lease: Callable[[int], Awaitable[None]]
    ) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.on_new_lease = on_new_lease
        self.lease = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.lease = await self.etcd.grant(self.ttl)
        self._task = asyncio.create_task(self._keep())
        return self.lease

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if await self.etcd.refresh(self.lease) > 0:
                    continue
            except ClusterError as exc:
                log.info("lease refresh failed (%s): etcd unreachable", exc)
                continue  # the lease may still live: try again next round
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
        if self.lease:
            await self.etcd.revoke(self.lease)
