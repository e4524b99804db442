"""One client connection to the node: read frames, run operations, answer.

Requests of one connection run in order, so replies come back in the order the client
pipelined them. Payloads never pass through an intermediate buffer: a ``PUT`` reserves
slots in the memory arena and receives each block straight into its slot, a ``GET``
leases the blocks and sends straight from the arena. Store calls that may touch a disk
(reserving may demote, leasing may promote, committing may write through) run in a
worker thread so the event loop keeps serving other connections.

A session tracks the two-phase writes and the leases of its client; when the client
goes away, they are aborted and released at once (their deadlines are only the
backstop for a client that hangs without disconnecting).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from kvtier import protocol as proto
from kvtier._sockio import Channel, send_fd
from kvtier.core.keys import BlockKey, KeyChain
from kvtier.errors import (
    ConnectionLostError,
    KeyFormatError,
    LayoutError,
    NodeError,
    ProtocolError,
    RemoteError,
)
from kvtier.protocol import FrameHeader, Kind, Op
from kvtier.results import BlockLease, Reservation
from kvtier.server.tenants import OPERATOR, Caller, identify, scope_keys

if TYPE_CHECKING:
    from kvtier.server.node import Node

__all__ = ["Session"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_STATUS_CODES = {"reserved": 0, "stored": 1, "refused": 2}
_MAX_AHEAD = 2  # reservations made ahead one connection may hold unused


class Session:
    """Serves one connection until the client leaves or breaks the protocol."""

    _ids = itertools.count(1)

    def __init__(self, node: Node, channel: Channel, peer: str, *, local: bool) -> None:
        self.node = node
        self.store = node.store
        self.channel = channel
        self.peer = peer
        self.local = local  # a Unix-socket client on this host: may map the arena
        self.limits = node.config.server
        # Who the client is, once HELLO said (tenants.py); None: not yet known.
        self.caller: Caller | None = None if self.limits.auth_token else OPERATOR
        self.greeted = False  # HELLO went through
        self.reservations: dict[int, Reservation] = {}
        # Reservations made ahead for the client's next puts (see _reserve_ahead):
        # not counted against max_open_per_connection, and at most _MAX_AHEAD.
        self.ahead_ids: set[int] = set()
        self.leases: dict[int, BlockLease] = {}
        self._lease_ids = itertools.count(1)
        self._handlers: dict[int, Callable[..., Any]] = {
            Op.HELLO: self._hello,
            Op.PING: self._ping,
            Op.ARENA: self._arena,
            Op.PUT: self._put,
            Op.GET: self._get,
            Op.MATCH: self._match,
            Op.CONTAINS: self._contains,
            Op.DELETE: self._delete,
            Op.LIST: self._list,
            Op.PREFETCH: self._prefetch,
            Op.STATS: self._stats,
            Op.FINISH: self._finish,
            Op.RESERVE: self._reserve,
            Op.COMMIT: self._commit,
            Op.ABORT: self._abort,
            Op.LEASE: self._lease,
            Op.RELEASE: self._release,
        }

    async def serve(self) -> None:
        header_buf = bytearray(proto.HEADER.size)
        limit = self.limits.max_payload_bytes
        try:
            while True:
                if self.greeted:
                    frame = await self._read_frame(header_buf, limit)
                else:
                    # A stranger gets hello_timeout to authenticate: idle connections
                    # that never say HELLO must not hold every max_connections slot.
                    async with asyncio.timeout(self.limits.hello_timeout):
                        frame = await self._read_frame(header_buf, limit)
                if frame is None:
                    return  # the stream is out of step: hang up
                await self._run(*frame)
        except ConnectionLostError:
            pass
        except TimeoutError:
            log.info("closing %s: no HELLO in time", self.peer)
        except ProtocolError as exc:
            log.info("closing %s: %s", self.peer, exc)
        finally:
            self._cleanup()
            self.channel.close()

    async def _read_frame(
        self, header_buf: bytearray, limit: int
    ) -> tuple[FrameHeader, bytearray] | None:
        """The next request's header and body (its payload stays in the stream for
        the handler); ``None`` after answering a header that cannot be parsed."""
        await self.channel.recv_into(header_buf)
        try:
            header = FrameHeader.unpack(header_buf, limit)
        except ProtocolError as exc:
            await self._send_error(0, 0, "bad_frame", str(exc))
            return None
        body = bytearray(header.body_bytes)
        await self.channel.recv_into(body)
        return header, body

    async def _run(self, header: FrameHeader, raw_body: bytearray) -> None:
        started = time.perf_counter()
        remaining = [header.payload_bytes]  # what the handler still has to read
        try:
            if header.kind != Kind.REQUEST:
                raise RemoteError(
                    "bad_request", f"frame kind {header.kind} from client"
                )
            handler = self._handlers.get(header.op)
            if handler is None:
                raise RemoteError("unknown_op", f"operation {header.op} is not known")
            if self.caller is None and header.op != Op.HELLO:
                await self._send_error(
                    header.request_id,
                    header.op,
                    "unauthorized",
                    "send HELLO with the node's token first",
                )
                raise ProtocolError("request before authentication")
            try:
                body = proto.decode_body(raw_body)
            except ProtocolError as exc:  # the frame's bounds are intact: go on
                raise RemoteError("bad_request", str(exc)) from exc
            await handler(header, body, remaining)
        except RemoteError as exc:
            await self._drain(remaining)
            await self._send_error(
                header.request_id, header.op, exc.code, str(exc).split(": ", 1)[-1]
            )
        except (LayoutError, KeyFormatError) as exc:  # the store refused the input
            await self._drain(remaining)
            await self._send_error(
                header.request_id, header.op, "bad_request", str(exc)
            )
        except NodeError:
            raise  # the connection itself broke or is out of step: serve() ends it
        except Exception as exc:
            # A bug. Say so, and hang up: a payload may be half read.
            log.exception("request %s from %s failed", header.op, self.peer)
            await self._send_error(
                header.request_id, header.op, "internal", f"{type(exc).__name__}"
            )
            raise ProtocolError(f"internal error: {exc!r}") from exc
        finally:
            self.node.metrics.observe_op(
                header.op, time.perf_counter() - started, header.payload_bytes
            )

    # ------------------------------------------------------------- replies

    async def _reply(
        self,
        header: FrameHeader,
        body: dict[str, Any],
        payload: list[Any] | None = None,
    ) -> None:
        payload = payload or []
        nbytes = sum(memoryview(p).nbytes for p in payload)
        frame = proto.encode_frame(
            Kind.REPLY, header.op, header.request_id, body, nbytes
        )
        await self.channel.send([frame, *payload])

    async def _send_error(
        self, request_id: int, op: int, code: str, message: str
    ) -> None:
        frame = proto.encode_frame(
            Kind.ERROR, op, request_id, {"code": code, "message": message}
        )
        await self.channel.send([frame])

    async def _drain(self, remaining: list[int]) -> None:
        if remaining[0]:
            await self.channel.discard(remaining[0])
            remaining[0] = 0

    def _no_payload(self, remaining: list[int]) -> None:
        if remaining[0]:
            raise RemoteError("bad_request", "this operation takes no payload")

    @contextlib.asynccontextmanager
    async def _transfer(self, what: str, nbytes: int) -> AsyncIterator[None]:
        """Bounds a payload's trip across the connection by server.transfer_timeout;
        past it the connection is dropped (the frame is cut short)."""
        try:
            async with asyncio.timeout(self.limits.transfer_timeout):
                yield
        except TimeoutError:
            log.warning(
                "closing %s: it %s of %d bytes slower than server.transfer_timeout "
                "(%s s)",
                self.peer,
                what,
                nbytes,
                self.limits.transfer_timeout,
            )
            raise ConnectionLostError("transfer_timeout") from None

    async def _off_loop(
        self, needs_io: bool, fn: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> _T:
        """Runs a store call in a worker thread when it might wait on a disk, and on
        the loop otherwise: a thread hop costs more than a memory-only call."""
        if needs_io:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    # ------------------------------------------------------------- handshake

    async def _hello(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        caller = identify(self.limits, str(body.get("token") or ""))
        if caller is None:
            await self._send_error(
                header.request_id, header.op, "unauthorized", "wrong or missing token"
            )
            raise ProtocolError(f"{self.peer} failed authentication")
        version = body.get("version")
        if version != proto.VERSION:
            raise RemoteError("bad_request", f"protocol version {version!r} is not 1")
        self.caller, self.greeted = caller, True
        info = self.node.hello_info()
        if not caller.is_operator:
            info["unix"] = ""  # the mapped arena holds every tenant's blocks
        await self._reply(header, info)

    async def _ping(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        await self._reply(header, {})

    async def _arena(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        self._operators_only("the shared-memory path")
        fd = self.store.arena_fd
        if not self.local or fd is None or self.channel.sock is None:
            raise RemoteError("unavailable", "the arena is shared over the Unix socket")
        frame = proto.encode_frame(
            Kind.REPLY, header.op, header.request_id, {"bytes": self.store.arena_bytes}
        )
        await send_fd(self.channel.sock, frame, fd)

    # ------------------------------------------------------------- data path

    async def _put(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        chain = self._chain(body)
        sizes = proto.field_sizes(body, len(chain))
        if sum(sizes) != rest[0]:
            raise RemoteError(
                "bad_request",
                f"sizes add up to {sum(sizes)} bytes, the payload has {rest[0]}",
            )
        # The payload goes straight into the reserved slots: they are this call's
        # until it commits or aborts (a reservation_timeout could hand them to
        # other blocks while a slow client's bytes still land in them), and a
        # client slower than transfer_timeout is cut off.
        reservation = await self._off_loop(
            self.store.reserve_needs_io(sum(sizes), chain.quota_group),
            self.store.reserve,
            chain,
            sizes,
            timeout=math.inf,
        )
        try:
            async with self._transfer("sent a put", sum(sizes)):
                for slot in reservation.slots:
                    if slot.status == "reserved":
                        await self.channel.recv_into(
                            self.store.arena_view(slot.offset, slot.nbytes)
                        )
                    else:
                        await self.channel.discard(slot.nbytes)
                    rest[0] -= slot.nbytes
        except BaseException:
            self.store.abort(reservation)
            raise
        result = await self._off_loop(
            self.store.commit_needs_io(), self.store.commit, reservation
        )
        self.node.metrics.observe_received(sum(sizes))
        await self._reply(header, {"stored": list(result.stored)})

    async def _get(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        """The leading stored blocks; with ``exact``, every stored one (size -1 marks
        a missing block, which has no bytes in the payload)."""
        self._no_payload(rest)
        keys = self._keys(body)
        exact = body.get("exact", False) is True
        leases = []
        # The blocks go out of the arena as the socket takes them: they are held
        # until the reply is out (released below, whatever happens), and a client
        # slower than transfer_timeout is cut off, so nothing is sent once released.
        # (A lease that ran out mid-send would let the slots go to other blocks.)
        try:
            for group in [[key] for key in keys] if exact else [keys]:
                needs_io = self.store.lease_needs_io(group)
                leases.append(
                    await self._off_loop(
                        needs_io, self.store.lease, group, seconds=math.inf
                    )
                )
            views = [view for lease in leases for view in lease.views]
            sizes = (
                [lease.views[0].nbytes if lease.views else -1 for lease in leases]
                if exact
                else [view.nbytes for view in views]
            )
            nbytes = sum(view.nbytes for view in views)
            async with self._transfer("read a reply", nbytes):
                await self._reply(header, {"sizes": sizes}, views)
            self.node.metrics.observe_sent(nbytes)
        finally:
            for lease in leases:
                lease.release()

    async def _match(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        keys = self._keys(body)
        window = proto.field_optional(body, "window", int)
        if window is not None and window <= 0:
            raise RemoteError("bad_request", f"window must be positive, got {window}")
        match = self.store.match(keys, window=window)
        await self._reply(
            header, {"num_blocks": match.num_blocks, "tiers": list(match.tiers)}
        )

    async def _contains(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        keys = self._keys(body)
        await self._reply(header, {"present": self.store.contains(keys)})

    async def _delete(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        keys = self._keys(body)
        removed = await self._off_loop(True, self.store.delete, keys)
        await self._reply(header, {"removed": removed})

    async def _finish(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        self.store.finish(self._keys(body))
        await self._reply(header, {})

    async def _list(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        self._operators_only("LIST")
        group = proto.field_optional(body, "group", str)
        limit = proto.field_optional(body, "limit", int)
        infos = self.store.list(group, limit)
        blocks = [[i.key, i.nbytes, i.group, list(i.tiers), i.expire_at] for i in infos]
        await self._reply(header, {"blocks": blocks})

    async def _prefetch(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        keys = self._keys(body)
        in_memory = await asyncio.wrap_future(self.store.prefetch(keys))
        await self._reply(header, {"in_memory": in_memory})

    async def _stats(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        self._operators_only("STATS")
        await self._reply(header, self.node.status())

    # ------------------------------------------------------------- two-phase

    def _need_local(self) -> None:
        if not self.local or self.store.arena_fd is None:
            raise RemoteError(
                "unavailable", "two-phase calls need the same-host shared-memory path"
            )

    async def _reserve(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        self._need_local()
        self._check_open_count()
        chain = self._chain(body)
        sizes = proto.field_sizes(body, len(chain))
        timeout = proto.field_optional(body, "timeout", (int, float))
        if timeout is not None and not timeout > 0:
            raise RemoteError("bad_request", f"timeout must be > 0 s, got {timeout}")
        reservation = await self._off_loop(
            self.store.reserve_needs_io(sum(sizes), chain.quota_group),
            self.store.reserve,
            chain,
            sizes,
            timeout=timeout,
        )
        self.reservations[reservation.reservation_id] = reservation
        slots = [[_STATUS_CODES[s.status], s.offset] for s in reservation.slots]
        await self._reply(
            header,
            {
                "id": reservation.reservation_id,
                "slots": slots,
                "deadline": reservation.deadline,
            },
        )

    async def _commit(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        reservation_id = proto.field_int(body, "id")
        ahead = self._ahead(body)  # checked before anything is committed
        if "keys" in body:  # a reservation made ahead, named now
            chain = self._chain(body)
            sizes = proto.field_sizes(body, len(chain))
            reservation = self.reservations.get(reservation_id)
            if reservation is None or reservation_id not in self.ahead_ids:
                raise RemoteError(
                    "bad_request",
                    f"no open reservation {reservation_id} made ahead (keys name "
                    "only those)",
                )
            result = await self._off_loop(
                self.store.commit_needs_io(),
                self.store.commit_as,
                reservation,
                chain,
                sizes,
            )
            self._take_reservation(reservation_id)
        else:
            reservation = self._take_reservation(reservation_id)
            result = await self._off_loop(
                self.store.commit_needs_io(), self.store.commit, reservation
            )
        reply: dict[str, Any] = {"stored": list(result.stored)}
        if ahead is not None:
            try:
                reserved = await self._reserve_ahead(*ahead)
            except Exception as exc:  # the commit stands: say so, without slots
                log.debug("no slots ahead for %s: %r", self.peer, exc)
                reserved = None
            if reserved is not None:
                reply["ahead"] = reserved
        await self._reply(header, reply)

    def _ahead(self, body: dict[str, Any]) -> tuple[list[int], str] | None:
        """A commit's ``ahead``: the sizes and quota group of the client's next put,
        to reserve slots for now (a tenant's group is its own)."""
        ahead = body.get("ahead")
        if ahead is None:
            return None
        self._need_local()
        sizes = ahead.get("sizes") if isinstance(ahead, dict) else None
        if not isinstance(sizes, list) or not sizes:
            raise RemoteError(
                "bad_request", "ahead must be a map with a list of sizes and a group"
            )
        sizes = proto.field_sizes(ahead, len(sizes))
        self._check_per_request(len(sizes), "sizes")
        group = proto.field_optional(ahead, "group", str) or "default"
        assert self.caller is not None, "authenticated before any keyed request"
        return sizes, self.caller.tenant or group

    async def _reserve_ahead(
        self, sizes: list[int], group: str
    ) -> dict[str, Any] | None:
        """Slots for the client's next put, reserved now so that put makes one round
        trip instead of two; ``None`` when there is no room, or the connection holds
        ``_MAX_AHEAD`` such reservations unused (the next put then reserves as
        usual). Only the client knows whether it is copying into one already, so
        only the client gives back the ones it will not use."""
        self._drop_expired()
        if len(self.ahead_ids) >= _MAX_AHEAD:
            return None  # the client has not used (or given back) the last ones
        reservation = await self._off_loop(
            self.store.reserve_needs_io(sum(sizes), group),
            self.store.reserve_ahead,
            sizes,
            group,
        )
        if not reservation.slots:
            return None
        self.reservations[reservation.reservation_id] = reservation
        self.ahead_ids.add(reservation.reservation_id)
        return {
            "id": reservation.reservation_id,
            "offsets": [slot.offset for slot in reservation.slots],
            "deadline": reservation.deadline,
        }

    async def _abort(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        self.store.abort(self._take_reservation(proto.field_int(body, "id")))
        await self._reply(header, {})

    async def _lease(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        self._need_local()
        self._check_open_count()
        keys = self._keys(body)
        lease = await self._off_loop(
            self.store.lease_needs_io(keys), self.store.lease, keys
        )
        lease_id = next(self._lease_ids)
        self.leases[lease_id] = lease
        slots = [[o, v.nbytes] for o, v in zip(lease.offsets, lease.views, strict=True)]
        await self._reply(
            header, {"id": lease_id, "slots": slots, "deadline": lease.deadline}
        )

    async def _release(
        self, header: FrameHeader, body: dict[str, Any], rest: list[int]
    ) -> None:
        self._no_payload(rest)
        self._take(self.leases, proto.field_int(body, "id")).release()
        await self._reply(header, {})

    # ------------------------------------------------------------- helpers

    def _keys(self, body: dict[str, Any]) -> list[BlockKey]:
        """The request's keys, at most max_keys_per_request, scoped to the caller."""
        keys = proto.field_keys(body)
        self._check_per_request(len(keys), "keys")
        assert self.caller is not None, "authenticated before any keyed request"
        return scope_keys(self.caller, keys)

    def _check_per_request(self, count: int, what: str) -> None:
        limit = self.limits.max_keys_per_request
        if count > limit:
            raise RemoteError(
                "bad_request",
                f"{count} {what} is over server.max_keys_per_request={limit}",
            )

    def _operators_only(self, what: str) -> None:
        if self.caller is not None and not self.caller.is_operator:
            raise RemoteError(
                "unauthorized", f"{what} needs the operators' token, not a tenant's"
            )

    def _take_reservation(self, reservation_id: int) -> Reservation:
        self.ahead_ids.discard(reservation_id)
        return self._take(self.reservations, reservation_id)

    def _drop_expired(self) -> None:
        """Ends this connection's reservations and leases past their deadline: the
        store's sweep takes their slots back anyway, and a client that never saw
        them (its call was cancelled) would not give them back before it leaves."""
        now = time.time()
        for rid in [i for i, r in self.reservations.items() if r.deadline <= now]:
            self.store.abort(self._take_reservation(rid))
        for lid in [i for i, lease in self.leases.items() if lease.deadline <= now]:
            self._take(self.leases, lid).release()

    def _check_open_count(self) -> None:
        self._drop_expired()
        limit = self.limits.max_open_per_connection
        held = len(self.reservations) + len(self.leases) - len(self.ahead_ids)
        if held >= limit:
            raise RemoteError(
                "bad_request",
                f"this connection holds server.max_open_per_connection={limit} "
                "reservations and leases; commit, abort or release some first",
            )

    @staticmethod
    def _take(table: dict[int, _T], item_id: int) -> _T:
        item = table.pop(item_id, None)
        if item is None:
            raise RemoteError("bad_request", f"no open reservation or lease {item_id}")
        return item

    def _chain(self, body: dict[str, Any]) -> KeyChain:
        """A put's keys, parents and quota group: a tenant's are its own."""
        keys = self._keys(body)
        parent = proto.field_optional(body, "parent", bytes)
        group = proto.field_optional(body, "group", str)
        chained = body.get("chained", True)
        if not isinstance(chained, bool):
            raise RemoteError("bad_request", "chained must be true or false")
        if parent is not None and len(parent) != 16:
            raise RemoteError("bad_request", "parent must be a 16-byte key")
        parents = body.get("parents")
        assert self.caller is not None, "authenticated before any keyed request"
        scope = functools.partial(scope_keys, self.caller)
        if self.caller.tenant is not None:
            group = self.caller.tenant
        return KeyChain(
            keys,
            None,
            scope([parent])[0] if parent else None,
            group=group,
            chained=chained,
            parents=None if parents is None else _parents(parents, len(keys), scope),
        )

    def _cleanup(self) -> None:
        """The client left: its reservations and leases end now."""
        for reservation in self.reservations.values():
            self.store.abort(reservation)
        for lease in self.leases.values():
            lease.release()
        self.reservations.clear()
        self.leases.clear()


def _parents(
    parents: Any, count: int, scope: Callable[[list[bytes]], list[BlockKey]]
) -> list[BlockKey | None]:
    """A PUT's explicit per-key parents (a cluster scatters one prompt's blocks)."""
    if not isinstance(parents, list) or len(parents) != count:
        raise RemoteError("bad_request", f"parents must be a list of {count} keys")
    for i, parent in enumerate(parents):
        if parent is not None and (not isinstance(parent, bytes) or len(parent) != 16):
            raise RemoteError("bad_request", f"parents[{i}] must be 16 bytes or nil")
    return [scope([p])[0] if p is not None else None for p in parents]
