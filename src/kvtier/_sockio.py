"""asyncio socket I/O without intermediate buffers, shared by the node and the client.

asyncio's streams copy every byte through a ``StreamReader`` buffer and its transports
join or buffer what a send leaves over; for multi-megabyte KV blocks those copies cost
as much as the transfer. These helpers drive a non-blocking socket with the loop's
``sock_recv_into`` / ``sock_sendall``, so payloads go straight between the kernel and
the memory arena or the caller's buffer. TLS sockets (``ssl.SSLSocket``) do not work
with those calls; :class:`Channel` wraps either kind behind the same three methods.
"""

from __future__ import annotations

import array
import asyncio
import select
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kvtier.errors import ConnectionLostError

__all__ = ["Channel", "host_id", "recv_fd", "scratch_views", "send_fd"]


class Channel:
    """One connected socket: exact receives into buffers, sends from buffers.

    Plain sockets use the loop's zero-copy socket calls; a TLS connection goes
    through an asyncio stream (TLS must copy to encrypt anyway).
    """

    def __init__(
        self,
        sock: socket.socket | None = None,
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
    ) -> None:
        assert (sock is None) != (streams is None), "a socket or TLS streams"
        self.sock = sock
        self._streams = streams
        if sock is not None:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def recv_into(self, buffer: Any) -> None:
        """Fills ``buffer`` exactly.

        Raises:
            ConnectionLostError: The peer closed or reset the connection first.
        """
        view = memoryview(buffer).cast("B")
        while view:
            view = view[await self.recv_some(view) :]

    async def recv_some(self, view: memoryview) -> int:
        """Receives at least one byte into the start of ``view`` (not empty), and
        returns how many.

        Safe to cancel: bytes leave the socket only in the step that returns their
        count (``loop.sock_recv_into`` may have taken them when a cancel lands, and
        then their count is lost, and with it the stream's place).

        Raises:
            ConnectionLostError: The peer closed or reset the connection first.
        """
        if self._streams is not None:
            try:
                data = await self._streams[0].read(len(view))
            except OSError as exc:
                raise ConnectionLostError(f"connection lost: {exc}") from exc
            if not data:
                raise ConnectionLostError("the peer closed the connection")
            view[: len(data)] = data
            return len(data)
        assert self.sock is not None
        while True:
            try:
                count = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                await _wait(self.sock, readable=True)
                continue
            except OSError as exc:
                raise ConnectionLostError(f"connection lost: {exc}") from exc
            if count == 0:
                raise ConnectionLostError("the peer closed the connection")
            return count

    async def discard(self, nbytes: int) -> None:
        """Reads and drops ``nbytes`` (a payload nobody wants)."""
        for chunk in scratch_views(nbytes):
            await self.recv_into(chunk)

    async def send(self, buffers: Sequence[Any]) -> None:
        """Sends every buffer, in order, without joining them.

        Raises:
            ConnectionLostError: The peer went away.
        """
        if self._streams is not None:
            writer = self._streams[1]
            try:
                writer.writelines(buffers)
                await writer.drain()
            except OSError as exc:
                raise ConnectionLostError(f"connection lost: {exc}") from exc
            return
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        try:
            for buffer in buffers:
                await loop.sock_sendall(self.sock, buffer)
        except OSError as exc:
            raise ConnectionLostError(f"connection lost: {exc}") from exc

    # -------------------------------------------- on the calling thread

    @property
    def can_block(self) -> bool:
        """Whether the ``*_now`` calls work (a plain socket; TLS goes through
        asyncio streams)."""
        return self.sock is not None

    def recv_into_now(self, buffer: Any, deadline: float | None) -> None:
        """:meth:`recv_into`, waiting on the calling thread instead of the loop:
        for a caller that runs nothing else on its loop (the blocking client), which
        saves the loop's reader registration and task switches on every request.

        Raises:
            ConnectionLostError: The peer closed or reset the connection first.
            TimeoutError: ``deadline`` (``time.monotonic()``) passed first.
        """
        view = memoryview(buffer).cast("B")
        while view:
            view = view[self.recv_some_now(view, deadline) :]

    def recv_some_now(self, view: memoryview, deadline: float | None) -> int:
        """:meth:`recv_some` on the calling thread (see :meth:`recv_into_now`).

        Raises:
            ConnectionLostError: The peer closed or reset the connection first.
            TimeoutError: ``deadline`` (``time.monotonic()``) passed first.
        """
        assert self.sock is not None, "a plain socket"
        while True:
            try:
                count = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                _poll(self.sock, select.POLLIN, deadline)
                continue
            except OSError as exc:
                raise ConnectionLostError(f"connection lost: {exc}") from exc
            if count == 0:
                raise ConnectionLostError("the peer closed the connection")
            return count

    def send_now(self, buffers: Sequence[Any], deadline: float | None) -> None:
        """:meth:`send` on the calling thread (see :meth:`recv_into_now`); the
        buffers go out in one gathered write where the socket takes them.

        Raises:
            ConnectionLostError: The peer went away.
            TimeoutError: ``deadline`` passed first.
        """
        assert self.sock is not None, "a plain socket"
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
        while views:
            try:
                sent = self.sock.sendmsg(views[:_IOV_MAX])
            except BlockingIOError:
                _poll(self.sock, select.POLLOUT, deadline)
                continue
            except OSError as exc:
                raise ConnectionLostError(f"connection lost: {exc}") from exc
            while sent:  # drop what went out
                if sent >= views[0].nbytes:
                    sent -= views.pop(0).nbytes
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def close(self) -> None:
        """Closes at once (a TLS connection without its goodbye: we are leaving)."""
        if self._streams is not None:
            self._streams[1].transport.abort()
        elif self.sock is not None:
            self.sock.close()


def scratch_views(nbytes: int) -> Iterator[memoryview]:
    """Buffers to read ``nbytes`` nobody wants into, a megabyte at a time."""
    scratch = memoryview(bytearray(min(nbytes, 1 << 20)))
    while nbytes:
        chunk = scratch[: min(nbytes, len(scratch))]
        yield chunk
        nbytes -= len(chunk)


_IOV_MAX = 512  # buffers per sendmsg, under the kernel's 1024


def _poll(sock: socket.socket, events: int, deadline: float | None) -> None:
    """Waits on the calling thread until ``sock`` is ready for ``events``.

    Raises:
        TimeoutError: ``deadline`` passed first.
    """
    poller = select.poll()
    poller.register(sock, events)
    while True:
        if deadline is None:
            wait_ms = None
        else:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
        if poller.poll(wait_ms):
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("the socket was not ready in time")


async def _wait(sock: socket.socket, readable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    if readable:
        loop.add_reader(fd, _wake, ready)
    else:
        loop.add_writer(fd, _wake, ready)
    try:
        await ready
    finally:
        if readable:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():  # it may have been cancelled in the same loop pass
        ready.set_result(None)


async def send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    """Sends ``data`` with a file descriptor attached (SCM_RIGHTS, Unix sockets)."""
    fds = array.array("i", [fd])
    while True:
        try:
            sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            break
        except BlockingIOError:
            await _wait(sock, readable=False)
    if sent < len(data):
        await asyncio.get_running_loop().sock_sendall(sock, data[sent:])


async def recv_fd(sock: socket.socket, nbytes: int) -> tuple[bytes, int | None]:
    """Receives up to ``nbytes`` and the file descriptor sent with them, if any."""
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, nbytes, 1)
            break
        except BlockingIOError:
            await _wait(sock, readable=True)
    if not data:
        raise ConnectionLostError("the node closed the connection")
    return data, (fds[0] if fds else None)


def host_id() -> str:
    """This machine's identity for one boot: a node and a client with the same one
    run on the same kernel, so the client may map the node's memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
