"""``kvtier.AsyncClient``: the node's store, over the network or shared memory.

On connect the client says HELLO over TCP; when the node runs on the same machine
(same host and boot id) and its Unix socket is reachable (same network namespace), the
client switches to that socket and maps the node's memory arena: puts reserve slots
and copy blocks straight into them, gets lease blocks and copy straight out, and the
node never touches a payload byte. Elsewhere, payloads travel over TCP, sent from and
received into the caller's buffers.

Failures map to kvtier's exception tree. Requests that are safe to repeat (everything
but the two-phase calls) are retried on a broken connection or a timeout, with
exponential backoff, on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from kvtier._pinning import advise_huge_pages, pin_for_cuda, unpin
from kvtier._sockio import host_id
from kvtier.client.connection import Connection
from kvtier.core.keys import BlockKey, KeyChain
from kvtier.errors import (
    ConnectionLostError,
    LayoutError,
    RemoteError,
    RequestTimeoutError,
)
from kvtier.layout import KVLayout, block_arrays, copy_block, writable_bytes
from kvtier.protocol import Op
from kvtier.results import BlockInfo, Match, PutResult

__all__ = ["AsyncClient", "RemoteLease", "RemoteReservation"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Array = np.ndarray[Any, Any]
_STATUSES = ("reserved", "stored", "refused")


class RemoteReservation:
    """Reserved slots of a two-phase write; fill ``views[i]`` for ``keys[i]``.

    Commit or abort it through the client that reserved it (on the same connection:
    the node ties reservations to the connection that made them). At its
    ``deadline`` the node takes the slots back and may give them to other blocks, so
    write only while :meth:`writable` says so.
    """

    def __init__(
        self,
        conn: Connection,
        reservation_id: int,
        keys: list[BlockKey],
        statuses: list[str],
        views: list[Array | None],
        deadline: float,
    ) -> None:
        self.conn = conn
        self.reservation_id = reservation_id
        self.keys = keys
        self.statuses = statuses
        self.views = views
        self.deadline = deadline
        self.usable_until = _first_half(deadline)

    def writable(self) -> bool:
        """Whether a block may still be written into the views: in the first half
        of the reservation's life, so that only a stall of the other half in the
        middle of one block's copy could still be writing when the node takes the
        slots back."""
        return time.time() < self.usable_until


@dataclass
class _Ahead:
    """Slots the node reserved for this client's next put (see ``reserve_ahead``)."""

    conn: Connection
    reservation_id: int
    offsets: list[int]
    sizes: list[int]
    group: str
    # Unix time, the node's clock (the same host's): a put writes a block only in
    # the first half of the slots' life (see RemoteReservation.writable).
    usable_until: float

    def fits(self, sizes: list[int], group: str) -> bool:
        """Whether a put of blocks of ``sizes`` in ``group`` can use these slots now."""
        return (
            not self.conn.closed
            and group == self.group
            and len(sizes) <= len(self.sizes)
            and self.sizes[: len(sizes)] == sizes
            and time.time() < self.usable_until
        )


_AHEAD_MIN_MARGIN_S = 5.0  # slots with less than this to spare are not worth it


def _first_half(deadline: float) -> float:
    """The middle of the time from now to ``deadline`` (Unix time)."""
    now = time.time()
    return now + (deadline - now) / 2


class RemoteLease:
    """Leased blocks to read in place: ``views[i]`` holds block ``keys[i]``."""

    def __init__(
        self,
        conn: Connection,
        lease_id: int,
        keys: list[BlockKey],
        views: list[Array],
        deadline: float,
    ) -> None:
        self.conn = conn
        self.lease_id = lease_id
        self.keys = keys
        self.views = views
        self.deadline = deadline

    @property
    def num_blocks(self) -> int:
        return len(self.views)

    def expired(self) -> bool:
        """Whether the lease has run out (see ``BlockLease.expired``): the node is on
        this host, so its deadline is in this clock."""
        return time.time() >= self.deadline


class AsyncClient:
    """A client of one kvtier node. ``async with AsyncClient("host:7480") as c: ...``

    Args:
        address: ``host:port`` of the node's TCP protocol.
        token: The node's shared token, if it has one.
        tls: An ``ssl.SSLContext`` (or ``True`` for the default one) for TLS.
        shared_memory: Use the same-host path: ``None`` picks it when possible,
            ``False`` never does, ``True`` requires it.
        pool_size: Connections to keep (requests are pipelined over them).
        timeout: Seconds to wait for each reply.
        retries: Extra attempts of a request that is safe to repeat.
        backoff: First wait before a retry, doubled each time.
        pin_memory: Page-lock the mapped arena with CUDA (``cudaHostRegister``) so
            copies between it and a GPU run asynchronously: ``None`` does it when the
            program has imported torch and torch sees a CUDA device.
        reserve_ahead: On the same-host path, have each put's commit reserve slots
            for a next put of the same sizes, so that put copies at once and makes
            one round trip (its commit) instead of two. Costs one put's worth of
            arena held per client between puts (taken back by the node after
            ``store.reservation_timeout`` unused, or when the client leaves).
    """

    def __init__(
        self,
        address: str = "127.0.0.1:7480",
        *,
        token: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
        shared_memory: bool | None = None,
        pool_size: int = 4,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.05,
        pin_memory: bool | None = None,
        reserve_ahead: bool = True,
    ) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"address must be host:port, got {address!r}")
        self._tcp = (host.strip("[]"), int(port))
        self._token = token
        self._tls = ssl.create_default_context() if tls is True else (tls or None)
        self._want_shm = shared_memory
        self._pool_size = max(1, pool_size)
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._pin = pin_memory
        self._pinned_ptr: int | None = None
        self._pool: list[Connection | None] = []
        self._opening = asyncio.Lock()
        self._connecting = asyncio.Lock()
        self._turn = itertools.count()
        self._target: str | tuple[str, int] = self._tcp
        self._arena: Array | None = None
        self._arena_map: mmap.mmap | None = None
        self.node_info: dict[str, Any] = {}
        self._blocking = False  # see wait_on_calling_thread
        self._reserve_ahead = reserve_ahead
        self._ahead: _Ahead | None = None
        self._background: set[asyncio.Future[None]] = set()  # posts from callbacks

    # ------------------------------------------------------------- lifecycle

    async def connect(self) -> AsyncClient:
        """Says HELLO and picks the path (shared memory or TCP). Once: callers that
        race to the first request share one connection, none is left unclosed."""
        async with self._connecting:
            if not self._pool:
                await self._connect()
        return self

    async def _connect(self) -> None:
        first = await Connection.open(
            self._tcp, token=self._token, tls=self._tls, timeout=self._timeout
        )
        self.node_info = first.hello
        if self._want_shm is not False and self._is_local(first.hello):
            local = await self._open_local(first.hello["unix"])
            if local is not None:
                await first.close()
                first = local
        if self._want_shm and self._arena is None:
            await first.close()
            raise ConnectionLostError("the node's shared memory is not reachable")
        first.blocking = self._blocking
        self._pool = [first] + [None] * (self._pool_size - 1)

    @staticmethod
    def _is_local(hello: dict[str, Any]) -> bool:
        return bool(hello.get("unix")) and hello.get("host_id") == host_id()

    async def _open_local(self, unix_name: str) -> Connection | None:
        try:
            conn = await Connection.open(
                unix_name,
                token=self._token,
                tls=None,
                timeout=self._timeout,
                want_arena=True,
            )
        except (ConnectionLostError, OSError) as exc:
            log.info("same-host path unavailable (%s): using TCP", exc)
            return None
        assert conn.arena_fd is not None
        size = int(conn.hello["arena_bytes"])
        self._arena_map = mmap.mmap(conn.arena_fd, size)
        advise_huge_pages(self._arena_map)
        os.close(conn.arena_fd)  # the mapping keeps the memory
        self._arena = np.frombuffer(self._arena_map, dtype=np.uint8)
        self._target = unix_name
        self._pinned_ptr = pin_for_cuda(self._arena, self._pin)
        return conn

    def wait_on_calling_thread(self) -> None:
        """Lets requests wait for the socket on the calling thread rather than
        through the event loop, for an owner that runs nothing else on the loop
        while a call is under way (the blocking :class:`~kvtier.Client` does this;
        a request still goes through the loop while another one holds its
        connection)."""
        self._blocking = True
        for conn in self._pool:
            if conn is not None:
                conn.blocking = True

    @property
    def shared_memory(self) -> bool:
        """Whether this client uses the same-host shared-memory path."""
        return self._arena is not None

    async def close(self) -> None:
        for conn in self._pool:
            if conn is not None:
                await conn.close()
        self._pool = []
        if self._pinned_ptr is not None:
            unpin(self._pinned_ptr)
            self._pinned_ptr = None
        self._arena = None
        if self._arena_map is not None:
            with contextlib.suppress(BufferError):  # a view lives on; freed with it
                self._arena_map.close()
            self._arena_map = None

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------- plumbing

    async def _conn(self) -> Connection:
        if not self._pool:
            await self.connect()
        slot = next(self._turn) % len(self._pool)
        conn = self._pool[slot]
        if conn is not None and not conn.closed:
            return conn
        async with self._opening:  # one opener per slot, not one per caller
            conn = self._pool[slot]
            if conn is None or conn.closed:
                conn = await Connection.open(
                    self._target,
                    token=self._token,
                    tls=self._tls if isinstance(self._target, tuple) else None,
                    timeout=self._timeout,
                )
                conn.blocking = self._blocking
                self._pool[slot] = conn
        return conn

    async def _call(
        self, op: Op, body: dict[str, Any], **kwargs: Any
    ) -> dict[str, Any]:
        conn = await self._conn()
        return await conn.call(op, body, timeout=self._timeout, **kwargs)

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        delay = self._backoff
        for remaining in range(self._retries, -1, -1):
            try:
                return await attempt()
            except (ConnectionLostError, RequestTimeoutError) as exc:
                if remaining == 0:
                    raise
                log.debug("retrying after %s", exc)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------- store API

    async def put(
        self,
        keys: Sequence[BlockKey],
        blocks: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> PutResult:
        """Stores blocks (see ``TieredStore.put``)."""
        arrays = block_arrays(keys, blocks, layout)
        if self.shared_memory:
            return await self._put_local(keys, arrays)
        payload = [
            np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in arrays
        ]
        body = {**_chain_body(keys), "sizes": [p.nbytes for p in payload]}
        reply = await self._retrying(lambda: self._call(Op.PUT, body, payload=payload))
        return PutResult(tuple(bool(s) for s in reply["stored"]))

    async def _put_local(
        self, keys: Sequence[BlockKey], arrays: list[Array]
    ) -> PutResult:
        """Copies into slots reserved ahead by the last put when they fit (one round
        trip: the commit names them), else reserves first (two)."""
        sizes = [a.nbytes for a in arrays]
        group = keys.quota_group if isinstance(keys, KeyChain) else "default"
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not ahead.fits(sizes, group):
            await ahead.conn.post(Op.ABORT, {"id": ahead.reservation_id})
            ahead = None
        if ahead is not None:
            conn, reservation_id = ahead.conn, ahead.reservation_id
            arena = self._need_arena()
            views: list[Array | None] = [
                arena[offset : offset + size]
                for offset, size in zip(ahead.offsets, sizes, strict=False)
            ]
            body = {"id": reservation_id, **_chain_body(keys), "sizes": sizes}
            usable_until = ahead.usable_until
            already = [False] * len(arrays)  # sorted out at the commit
        else:
            reservation = await self.reserve(keys, sizes)
            conn, reservation_id = reservation.conn, reservation.reservation_id
            views, body = reservation.views, {"id": reservation_id}
            usable_until = reservation.usable_until
            already = [status == "stored" for status in reservation.statuses]
        try:
            for view, arr in zip(views, arrays, strict=True):
                if view is None:
                    continue
                if time.time() >= usable_until:  # stalled: see writable()
                    await conn.post(Op.ABORT, {"id": reservation_id})
                    log.warning(
                        "a put of %d blocks stalled past half its reservation's "
                        "time (store.reservation_timeout): not stored",
                        len(arrays),
                    )
                    return PutResult(tuple(already))
                copy_block(view, arr)
        except BaseException:
            await conn.post(Op.ABORT, {"id": reservation_id})
            raise
        if self._reserve_ahead and sizes:
            body["ahead"] = {"sizes": sizes, "group": group}
        try:
            reply = await conn.call(
                Op.COMMIT,
                body,
                timeout=self._timeout,
                late_reply=lambda late: self._give_back(
                    conn, Op.ABORT, late.get("ahead")
                ),
            )
        except RemoteError:
            await conn.post(Op.ABORT, {"id": reservation_id})  # still open there
            raise
        await self._keep_ahead(conn, reply.get("ahead"), sizes, group)
        return PutResult(tuple(bool(s) for s in reply["stored"]))

    def _give_back(
        self, conn: Connection, op: Op, granted: dict[str, Any] | None
    ) -> None:
        """Aborts (``op``) or releases what the late reply of a cancelled call
        granted, a reservation or a lease with ``granted["id"]`` (run from a done
        callback, on the loop): the caller never saw it, so nothing else would."""
        if granted is not None:
            task = asyncio.ensure_future(conn.post(op, {"id": int(granted["id"])}))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _keep_ahead(
        self,
        conn: Connection,
        ahead: dict[str, Any] | None,
        sizes: list[int],
        group: str,
    ) -> None:
        if ahead is None:
            return
        usable_until = _first_half(float(ahead["deadline"]))
        if usable_until - time.time() <= _AHEAD_MIN_MARGIN_S:
            # The node takes slots back sooner than a put could safely use them
            # (store.reservation_timeout is short): stop asking.
            self._reserve_ahead = False
            await conn.post(Op.ABORT, {"id": int(ahead["id"])})
            return
        offsets = [int(o) for o in ahead["offsets"]]
        kept = _Ahead(
            conn,
            int(ahead["id"]),
            offsets,
            sizes[: len(offsets)],
            group,
            usable_until,
        )
        stale, self._ahead = self._ahead, kept
        if stale is not None:  # a concurrent put's: one is enough
            await stale.conn.post(Op.ABORT, {"id": stale.reservation_id})

    async def get(
        self, keys: Sequence[BlockKey], *, layout: KVLayout | None = None
    ) -> list[Array]:
        """The leading stored blocks of ``keys`` (see ``TieredStore.get``)."""
        outs: list[Array] = []

        def sink(body: dict[str, Any]) -> list[Any]:
            outs[:] = [np.empty(size, dtype=np.uint8) for size in body["sizes"]]
            return outs

        if self.shared_memory:
            lease = await self.lease(keys)
            try:
                outs = [np.array(view) for view in lease.views]  # copies out
            finally:
                await self._release_later(lease)
            if _outlived(lease):
                outs = []
        else:
            await self._retrying(
                lambda: self._call(
                    Op.GET, {"keys": [bytes(k) for k in keys]}, sink=sink
                )
            )
        return [layout.view(a) for a in outs] if layout is not None else outs

    async def get_into(
        self,
        keys: Sequence[BlockKey],
        outs: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> int:
        """Copies the leading stored blocks into ``outs``; returns how many."""
        if len(outs) < len(keys):
            raise LayoutError(f"got {len(keys)} keys but only {len(outs)} buffers")
        targets = [writable_bytes(out, layout) for out in outs[: len(keys)]]
        if self.shared_memory:
            lease = await self.lease(keys)
            try:
                for view, target in zip(lease.views, targets, strict=False):
                    _check_size(target, view.nbytes)
                    np.copyto(target, view)
            finally:
                await self._release_later(lease)
            return 0 if _outlived(lease) else lease.num_blocks

        def sink(body: dict[str, Any]) -> list[Any]:
            sizes = body["sizes"]
            for target, size in zip(targets, sizes, strict=False):
                _check_size(target, size)
            return targets[: len(sizes)]

        reply = await self._retrying(
            lambda: self._call(Op.GET, {"keys": [bytes(k) for k in keys]}, sink=sink)
        )
        return len(reply["sizes"])

    async def get_blocks(self, keys: Sequence[BlockKey]) -> list[Array | None]:
        """Every stored block of ``keys``, in any order (``None`` where missing): the
        exact batch read, where ``get`` reads a prefix."""
        found: list[Array | None] = []

        def sink(body: dict[str, Any]) -> list[Any]:
            sizes = body["sizes"]
            found[:] = [np.empty(n, np.uint8) if n >= 0 else None for n in sizes]
            return [arr for arr in found if arr is not None]

        body = {"keys": [bytes(k) for k in keys], "exact": True}
        await self._retrying(lambda: self._call(Op.GET, body, sink=sink))
        return found

    async def match(
        self, keys: Sequence[BlockKey], *, window: int | None = None
    ) -> Match:
        body = {"keys": [bytes(k) for k in keys], "window": window}
        reply = await self._retrying(lambda: self._call(Op.MATCH, body))
        return Match(int(reply["num_blocks"]), tuple(reply["tiers"]))

    async def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """For each key, whether the node stores it (the 'exists' of other APIs)."""
        body = {"keys": [bytes(k) for k in keys]}
        reply = await self._retrying(lambda: self._call(Op.CONTAINS, body))
        return [bool(p) for p in reply["present"]]

    async def delete(self, keys: Sequence[BlockKey]) -> int:
        body = {"keys": [bytes(k) for k in keys]}
        reply = await self._retrying(lambda: self._call(Op.DELETE, body))
        return int(reply["removed"])

    async def finish(self, keys: Sequence[BlockKey]) -> None:
        """Hints that the prompt ``keys`` is finished (see ``TieredStore.finish``)."""
        body = {"keys": [bytes(k) for k in keys]}
        await self._retrying(lambda: self._call(Op.FINISH, body))

    async def list(
        self, group: str | None = None, limit: int | None = None
    ) -> list[BlockInfo]:
        body = {"group": group, "limit": limit}
        reply = await self._retrying(lambda: self._call(Op.LIST, body))
        return [
            BlockInfo(BlockKey(k), n, g, tuple(t), e if e is not None else float("inf"))
            for k, n, g, t, e in reply["blocks"]
        ]

    async def prefetch(self, keys: Sequence[BlockKey]) -> int:
        body = {"keys": [bytes(k) for k in keys]}
        reply = await self._retrying(lambda: self._call(Op.PREFETCH, body))
        return int(reply["in_memory"])

    async def stats(self) -> dict[str, Any]:
        return await self._retrying(lambda: self._call(Op.STATS, {}))

    async def ping(self) -> None:
        await self._retrying(lambda: self._call(Op.PING, {}))

    # ------------------------------------------------------------- two-phase

    async def reserve(
        self,
        keys: Sequence[BlockKey],
        sizes: Sequence[int],
        *,
        timeout: float | None = None,
    ) -> RemoteReservation:
        """Slots in the node's arena to copy blocks into (same-host path only)."""
        arena = self._need_arena()
        body = {**_chain_body(keys), "sizes": list(sizes), "timeout": timeout}
        conn = await self._conn()
        reply = await conn.call(
            Op.RESERVE,
            body,
            timeout=self._timeout,
            late_reply=lambda late: self._give_back(conn, Op.ABORT, late),
        )
        statuses, views = [], []
        for (code, offset), size in zip(reply["slots"], sizes, strict=True):
            statuses.append(_STATUSES[code])
            views.append(arena[offset : offset + size] if code == 0 else None)
        return RemoteReservation(
            conn, reply["id"], list(keys), statuses, views, reply["deadline"]
        )

    async def commit(self, reservation: RemoteReservation) -> PutResult:
        reply = await reservation.conn.call(
            Op.COMMIT, {"id": reservation.reservation_id}, timeout=self._timeout
        )
        return PutResult(tuple(bool(s) for s in reply["stored"]))

    async def abort(self, reservation: RemoteReservation) -> None:
        await reservation.conn.call(
            Op.ABORT, {"id": reservation.reservation_id}, timeout=self._timeout
        )

    async def lease(self, keys: Sequence[BlockKey]) -> RemoteLease:
        """Leases the leading stored blocks to read in place (same-host path only)."""
        arena = self._need_arena()
        conn = await self._conn()
        body = {"keys": [bytes(k) for k in keys]}
        reply = await conn.call(
            Op.LEASE,
            body,
            timeout=self._timeout,
            late_reply=lambda late: self._give_back(conn, Op.RELEASE, late),
        )
        views = []
        for offset, size in reply["slots"]:
            view = arena[offset : offset + size]
            view.flags.writeable = False
            views.append(view)
        return RemoteLease(
            conn, reply["id"], list(keys[: len(views)]), views, reply["deadline"]
        )

    async def _release_later(self, lease: RemoteLease) -> None:
        """Releases without waiting for the answer (one round trip saved per get)."""
        await lease.conn.post(Op.RELEASE, {"id": lease.lease_id})

    async def release(self, lease: RemoteLease) -> None:
        await lease.conn.call(Op.RELEASE, {"id": lease.lease_id}, timeout=self._timeout)

    def _need_arena(self) -> Array:
        if self._arena is None:
            raise ConnectionLostError(
                "two-phase calls need the same-host shared-memory path"
            )
        return self._arena


def _chain_body(keys: Sequence[BlockKey]) -> dict[str, Any]:
    body: dict[str, Any] = {"keys": [bytes(k) for k in keys]}
    if isinstance(keys, KeyChain):
        body["group"] = keys.quota_group
        body["parents"] = keys.parents()
    else:
        body["chained"] = False
    return body


def _outlived(lease: RemoteLease) -> bool:
    """Whether a copy out of ``lease`` ended after it ran out (so read maybe another
    block's bytes): the read is then a miss."""
    if not lease.expired():
        return False
    log.warning(
        "a read of %d blocks outlived its lease (store.lease_seconds): a miss",
        lease.num_blocks,
    )
    return True


def _check_size(target: Array, nbytes: int) -> None:
    if target.nbytes != nbytes:
        raise LayoutError(
            f"a buffer holds {target.nbytes} bytes, the block has {nbytes}"
        )
