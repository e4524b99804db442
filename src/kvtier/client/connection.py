"""One connection to a node: handshake, pipelined requests, zero-copy payloads.

Requests are written under a send lock, so any number of coroutines may share a
connection and keep several requests in flight (the node answers each connection in
order). Replies are read by whichever waiting caller holds the read lock: it reads
replies in order, handing each to its caller, until its own has come (leader and
followers). A dedicated reader task would do the same work with one more hand-off
between tasks per request, which measured twice the round trip of a lone request
(145 us against 67 us on a Unix socket here). A reply's payload is received straight
into buffers the caller's ``sink`` names: the blocks of a ``get_into`` land in the
caller's arrays without an intermediate copy.

A caller cancelled while it waits (its task cancelled, ``asyncio.wait_for``) leaves
the connection in step: where the reply being read stands is kept on the connection,
not in the reader, and bytes leave the socket only with their count
(``Channel.recv_some``), so the next reader goes on from there; the payload of a reply
whose caller is gone is dropped, never written into its buffers after it returned. A
request cancelled halfway through sending cannot be finished, so that closes the
connection. A connection that times out or breaks is closed and every request on it
fails with :class:`~kvtier.errors.ConnectionLostError` (or ``RequestTimeoutError``);
the client's pool opens a new one.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier import protocol as proto
from kvtier._sockio import Channel, recv_fd, scratch_views
from kvtier.errors import (
    AuthenticationError,
    ConnectionLostError,
    ProtocolError,
    RemoteError,
    RequestTimeoutError,
)
from kvtier.protocol import FrameHeader, Kind, Op

__all__ = ["Connection", "Sink"]

log = logging.getLogger(__name__)

Sink = Callable[[dict[str, Any]], Sequence[Any]]
"""Given a reply's body, the writable buffers its payload goes into, in order."""

_MAX_REPLY_PAYLOAD = 1 << 40


@dataclass
class _Waiting:
    request_id: int
    op: int
    future: asyncio.Future[dict[str, Any]]
    sink: Sink | None = field(default=None)
    orphaned: bool = False  # its caller was cancelled: nothing goes into its sink


class Connection:
    """A connected, authenticated channel to a node. Use :meth:`open`."""

    def __init__(self, channel: Channel, hello: dict[str, Any]) -> None:
        self.channel = channel
        self.hello = hello
        self.arena_fd: int | None = None
        self._send_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._ids = itertools.count(1)
        self._header = bytearray(proto.HEADER.size)
        # Where the reply being read stands (see _next_view).
        self._steps: Iterator[Any] | None = None
        self._view: memoryview | None = None
        self._payload_of: _Waiting | None = None
        self._discard = 0
        self._error: Exception | None = None
        self._closed_here = False
        # Set by a caller that runs nothing else on its loop while it waits (the
        # blocking Client): requests then wait for the socket on the calling thread,
        # not through the loop (a reader registration and two task switches less per
        # request). Calls fall back to the loop whenever another one is under way.
        self.blocking = False

    @classmethod
    async def open(
        cls,
        target: str | tuple[str, int],
        *,
        token: str | None,
        tls: ssl.SSLContext | None,
        timeout: float,
        want_arena: bool = False,
    ) -> Connection:
        """Connects (TCP ``(host, port)``, or an abstract Unix socket name), says
        HELLO and, on a Unix socket with ``want_arena``, receives the arena's memfd.

        Raises:
            ConnectionLostError: The node cannot be reached.
            RequestTimeoutError: It accepted the connection but did not answer.
            AuthenticationError: The node refused the token.
        """
        try:
            channel = await asyncio.wait_for(_connect(target, tls), timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLostError(f"cannot connect to {target!r}: {exc}") from exc
        try:
            body = {"version": proto.VERSION, "token": token or ""}
            hello = await asyncio.wait_for(_exchange(channel, Op.HELLO, body), timeout)
            conn = cls(channel, hello)
            if want_arena:
                conn.arena_fd = await asyncio.wait_for(_fetch_arena(channel), timeout)
        except TimeoutError as exc:
            channel.close()
            raise RequestTimeoutError(
                f"{target!r} accepted but did not answer HELLO in {timeout} s"
            ) from exc
        except BaseException:
            channel.close()
            raise
        return conn

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def call(
        self,
        op: Op,
        body: dict[str, Any],
        payload: Sequence[Any] = (),
        sink: Sink | None = None,
        timeout: float | None = None,
        late_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Sends one request and waits for its reply's body.

        ``late_reply`` gets the body of a reply that comes in after the caller was
        cancelled (on the loop, from whoever reads it): what it holds, such as slots
        reserved ahead, can then be given back.

        Raises:
            RemoteError: The node answered with an error.
            ConnectionLostError: The connection broke (it is closed).
            RequestTimeoutError: No reply in ``timeout`` (the connection is closed).
        """
        if self._error is not None:
            raise ConnectionLostError(str(self._error))
        waiting = _Waiting(0, op, asyncio.get_running_loop().create_future(), sink)
        if self._may_block():
            return self._call_now(waiting, body, payload, timeout)
        async with self._send_lock:
            buffers = self._frame(waiting, body, payload)
            try:
                await self.channel.send(buffers)
            except BaseException as exc:
                # Lost, or cancelled halfway through the frame: the node would read
                # the next request's bytes as the rest of this one (a put's payload
                # among them), so the connection must go.
                self._fail(_lost(exc))
                _retrieved(waiting.future)  # raised here instead
                raise
        try:
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                return await self._await_reply(waiting.future)
        except TimeoutError:
            raise self._timed_out(waiting, timeout) from None
        except asyncio.CancelledError:
            waiting.orphaned = True
            waiting.future.add_done_callback(_Orphan(late_reply))
            raise

    def _call_now(
        self,
        waiting: _Waiting,
        body: dict[str, Any],
        payload: Sequence[Any],
        timeout: float | None,
    ) -> dict[str, Any]:
        """:meth:`call` with its socket I/O on the calling thread (see
        :attr:`blocking`): the same frames, read by the same steps."""
        deadline = None if timeout is None else time.monotonic() + timeout
        buffers = self._frame(waiting, body, payload)
        try:
            self.channel.send_now(buffers, deadline)
            while not waiting.future.done():
                self._read_one_now(deadline)
        except TimeoutError:
            raise self._timed_out(waiting, timeout) from None
        except BaseException as exc:
            # Lost, or interrupted (Ctrl-C) halfway through a frame: either way the
            # stream is out of step, and the next request must not go on it.
            self._fail(_lost(exc))
            _retrieved(waiting.future)
            raise
        return waiting.future.result()

    def _may_block(self) -> bool:
        return (
            self.blocking
            and self.channel.can_block
            and not self._send_lock.locked()
            and not self._read_lock.locked()
        )

    def _frame(
        self, waiting: _Waiting, body: dict[str, Any], payload: Sequence[Any] = ()
    ) -> list[Any]:
        """Numbers a request, queues it for its reply, and returns its buffers."""
        nbytes = sum(memoryview(buf).nbytes for buf in payload)
        waiting.request_id = next(self._ids) & 0xFFFFFFFF
        frame = proto.encode_frame(
            Kind.REQUEST, waiting.op, waiting.request_id, body, nbytes
        )
        self._waiting.append(waiting)
        return [frame, *payload]

    def _timed_out(self, waiting: _Waiting, timeout: float | None) -> Exception:
        error = RequestTimeoutError(
            f"no answer to {Op(waiting.op).name} in {timeout} s"
        )
        self._fail(error)  # a reply may be half read: the stream is out of step
        _retrieved(waiting.future)
        return error

    async def post(self, op: Op, body: dict[str, Any]) -> None:
        """Sends a request whose reply nobody waits for (a release): the reply is read
        and dropped by whoever reads next, which saves the round trip. A failure is
        logged, never raised."""
        if self._error is not None:
            return
        waiting = _Waiting(0, op, asyncio.get_running_loop().create_future())
        waiting.future.add_done_callback(self._log_failure)
        try:
            if self._may_block():
                self.channel.send_now(self._frame(waiting, body), None)
                return
            async with self._send_lock:
                await self.channel.send(self._frame(waiting, body))
        except ConnectionLostError as exc:
            self._fail(exc)
        except BaseException as exc:  # interrupted mid-frame: out of step
            self._fail(_lost(exc))
            raise

    async def _await_reply(
        self, future: asyncio.Future[dict[str, Any]]
    ) -> dict[str, Any]:
        """Reads replies in order, as the reader of the moment, until ours is in."""
        while not future.done():
            async with self._read_lock:
                if not future.done():
                    try:
                        await self._read_one()
                    except ConnectionLostError:
                        _retrieved(future)  # failed with the rest; raised from here
                        raise
        return future.result()

    async def _read_one(self) -> None:
        """Reads the rest of the reply in progress, or the next one."""
        try:
            while (view := self._next_view()) is not None:
                self._advance(await self.channel.recv_some(view))
        except (ConnectionLostError, ProtocolError) as exc:
            self._fail(exc)
            raise ConnectionLostError(str(exc)) from exc

    def _read_one_now(self, deadline: float | None) -> None:
        try:
            while (view := self._next_view()) is not None:
                self._advance(self.channel.recv_some_now(view, deadline))
        except ProtocolError as exc:
            raise ConnectionLostError(str(exc)) from exc

    def _next_view(self) -> memoryview | None:
        """Where the reply being read goes on: the rest of the buffer in progress,
        else the next one :meth:`_reply_steps` names; ``None`` once the reply is
        complete (and handed to its waiter).

        The place in the stream lives on the connection, not in a reader: a reader
        cancelled in the middle of a reply (a caller's timeout, a cancelled task)
        leaves it here and the next reader goes on from it, so the stream never
        gets out of step.
        """
        while not self._discard:
            if self._view:
                owner = self._payload_of
                if owner is None or not owner.orphaned:
                    return self._view
                # Its caller has returned: the rest is not for its buffer.
                self._discard, self._view = len(self._view), None
                break
            if self._steps is None:
                self._steps = self._reply_steps()
            try:
                buffer = next(self._steps)
            except StopIteration:
                self._steps = None
                return None
            self._view = memoryview(buffer).cast("B")
        return memoryview(bytearray(min(self._discard, 1 << 20)))

    def _advance(self, count: int) -> None:
        """``count`` bytes went into the view :meth:`_next_view` gave."""
        if self._discard:
            self._discard -= count
        else:
            assert self._view is not None
            self._view = self._view[count:]

    def _reply_steps(self) -> Iterator[Any]:
        """Reads the next reply and hands it to its waiter: yields each buffer to be
        filled from the stream, in order, and goes on once it is full. The loop's
        reader and the calling thread's reader drive the same steps.

        A reply's payload goes straight into the buffers its waiter's ``sink`` names
        (asked even for an empty payload, so it sees every reply's body). The
        payload of an error reply, of a waiter whose caller is gone, or of one whose
        sink refused the reply (its error goes to the waiter) is dropped.
        """
        yield self._header
        header = FrameHeader.unpack(self._header, _MAX_REPLY_PAYLOAD)
        if not self._waiting or self._waiting[0].request_id != header.request_id:
            raise ProtocolError(f"unexpected reply {header.request_id}")
        waiting = self._waiting.popleft()
        raw = bytearray(header.body_bytes)
        yield raw
        body = proto.decode_body(raw)
        if header.kind == Kind.ERROR:
            yield from scratch_views(header.payload_bytes)
            _set(waiting.future, exception=_error_of(body))
            return
        buffers: Sequence[Any] = []
        if waiting.orphaned:
            yield from scratch_views(header.payload_bytes)
            _set(waiting.future, result=body)
            return
        if waiting.sink is not None:
            try:
                buffers = waiting.sink(body)
            except Exception as exc:  # a buffer that does not fit (LayoutError)
                yield from scratch_views(header.payload_bytes)
                _set(waiting.future, exception=exc)
                return
        if sum(memoryview(b).nbytes for b in buffers) != header.payload_bytes:
            raise ProtocolError(
                f"reply payload of {header.payload_bytes} bytes fits no buffers"
            )
        for buffer in buffers:
            self._payload_of = waiting  # (dropped in _next_view once it is orphaned)
            yield buffer
            self._payload_of = None
        _set(waiting.future, result=body)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        while self._waiting:
            _set(
                self._waiting.popleft().future,
                exception=ConnectionLostError(str(error)),
            )
        self.channel.close()

    async def close(self) -> None:
        self._closed_here = True
        self._fail(ConnectionLostError("the connection was closed"))

    def _log_failure(self, future: asyncio.Future[dict[str, Any]]) -> None:
        """Reports a request nobody awaits (a lease's release) that failed; one cut
        short by closing the connection is expected (the node drops the session's
        leases with it), so that one is only a debug line."""
        if future.cancelled() or future.exception() is None:
            return
        level = logging.DEBUG if self._closed_here else logging.WARNING
        log.log(level, "a request without a waiter failed: %s", future.exception())


@dataclass
class _Orphan:
    """Settles the reply of a request whose caller was cancelled: its error is
    dropped (nobody is left to raise it to), its body goes to ``late_reply``."""

    late_reply: Callable[[dict[str, Any]], None] | None

    def __call__(self, future: asyncio.Future[dict[str, Any]]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        if self.late_reply is not None:
            self.late_reply(future.result())


def _lost(exc: BaseException) -> ConnectionLostError:
    """The error that ends a connection whose stream ``exc`` left out of step."""
    if isinstance(exc, ConnectionLostError):
        return exc
    return ConnectionLostError(f"interrupted mid-frame: {exc!r}")


def _retrieved(future: asyncio.Future[dict[str, Any]]) -> None:
    """Marks a failed future's exception as seen (its error is raised elsewhere), so
    asyncio does not log it as never retrieved."""
    if future.done() and not future.cancelled():
        future.exception()


def _set(
    future: asyncio.Future[dict[str, Any]],
    result: dict[str, Any] | None = None,
    exception: Exception | None = None,
) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result or {})


def _error_of(body: dict[str, Any]) -> Exception:
    code = str(body.get("code", "internal"))
    message = str(body.get("message", ""))
    if code == "unauthorized":
        return AuthenticationError(message)
    return RemoteError(code, message)


async def _connect(
    target: str | tuple[str, int], tls: ssl.SSLContext | None
) -> Channel:
    loop = asyncio.get_running_loop()
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, "\0" + target)
        except OSError:
            sock.close()
            raise
        return Channel(sock=sock)
    host, port = target
    if tls is not None:
        streams = await asyncio.open_connection(host, port, ssl=tls)
        return Channel(streams=streams)
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, protocol, _, address = infos[0]
    sock = socket.socket(family, kind, protocol)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
    except OSError:
        sock.close()
        raise
    return Channel(sock=sock)


async def _exchange(channel: Channel, op: Op, body: dict[str, Any]) -> dict[str, Any]:
    """One request and its reply, before the reader task runs (the handshake)."""
    await channel.send([proto.encode_frame(Kind.REQUEST, op, 0, body)])
    header_buf = bytearray(proto.HEADER.size)
    await channel.recv_into(header_buf)
    header = FrameHeader.unpack(header_buf, 0)
    raw = bytearray(header.body_bytes)
    await channel.recv_into(raw)
    reply = proto.decode_body(raw)
    if header.kind == Kind.ERROR:
        raise _error_of(reply)
    return reply


async def _fetch_arena(channel: Channel) -> int:
    """Asks for the arena and receives its memfd with the reply (SCM_RIGHTS)."""
    assert channel.sock is not None, "the arena comes over a Unix socket"
    await channel.send([proto.encode_frame(Kind.REQUEST, Op.ARENA, 0, {})])
    data, fd = await recv_fd(channel.sock, 4096)  # the reply is one small frame
    header = FrameHeader.unpack(data[: proto.HEADER.size], 0)
    body = proto.decode_body(
        data[proto.HEADER.size : proto.HEADER.size + header.body_bytes]
    )
    if header.kind == Kind.ERROR or fd is None:
        raise (
            _error_of(body)
            if header.kind == Kind.ERROR
            else ProtocolError("the node sent no arena")
        )
    return fd
