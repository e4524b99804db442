"""A loopback TCP proxy that delays, drops and cuts connections, steered at runtime.

Put it between a client and a node (connect the client to ``proxy.address``),
between a cluster client and the nodes (each node advertises its proxy:
``cluster.advertise``), or between nodes and etcd (``cluster.etcd``). Faults:

* ``delay_s``: every chunk forwarded, either way, waits this long first;
* ``blackhole`` (a partition): nothing is forwarded, either way, and new connections
  are accepted but stall; held bytes flow again once it ends (TCP retransmits would do
  the same), so a peer sees a stall, then either its timeout or a late answer;
* ``refuse``: new connections are reset at once (a node that is down);
* ``cut_after_bytes``: a connection is reset once it carried that many bytes (one way
  or the other), which lands the cut mid-frame;
* :meth:`ChaosProxy.cut`: resets every open connection now.

Resets are real (``SO_LINGER`` 0, so the peer reads ``ECONNRESET``). Dropping bytes
silently is not offered: TCP never does that to a stream, it stalls or resets.

The proxy runs its own event loop in a daemon thread, so blocking code steers it; the
settings are plain attributes read by that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["ChaosProxy"]

_T = TypeVar("_T")
_CHUNK = 256 * 1024
_POLL_S = 0.005  # how soon a stalled pump notices the partition ended


@dataclass(eq=False)  # hashed by identity
class _Link:
    """One proxied connection: both sockets' writers, bytes carried."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    nbytes: int = 0


class ChaosProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``. Use as a context manager.

    Attributes:
        delay_s, blackhole, refuse, cut_after_bytes: The faults (module docstring).
        counts: ``connections``, ``refused``, ``cuts`` and ``bytes`` forwarded.
    """

    def __init__(self, target: tuple[str, int] | str, *, port: int = 0) -> None:
        if isinstance(target, str):
            host, _, text = target.rpartition(":")
            target = (host, int(text))
        self.target = target
        self.delay_s = 0.0
        self.blackhole = False
        self.refuse = False
        self.cut_after_bytes: int | None = None
        self.counts: Counter[str] = Counter()
        self._port = port
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvtier-chaos-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> ChaosProxy:
        self._thread.start()
        self._server = self._run(
            asyncio.start_server(self._on_connection, "127.0.0.1", self._port)
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            self._run(self._shut(server))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    # -- steering ---------------------------------------------------------------------

    def heal(self) -> None:
        """Ends every fault (open connections go on)."""
        self.delay_s = 0.0
        self.blackhole = self.refuse = False
        self.cut_after_bytes = None

    def cut(self) -> int:
        """Resets every open connection; how many there were."""
        return self._run(self._cut_all())

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _shut(self, server: asyncio.Server) -> None:
        """Stops listening and resets every link, on the proxy's loop: a Server is
        not thread-safe (closed from another thread while its last link ended, it
        woke its waiters twice and raised)."""
        server.close()
        await self._cut_all()

    async def _cut_all(self) -> int:
        links = list(self._links)
        for link in links:
            self._reset(link)
        return len(links)

    # -- forwarding -------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.refuse:
            self.counts["refused"] += 1
            _reset_writer(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.counts["refused"] += 1
            _reset_writer(writer)
            return
        self.counts["connections"] += 1
        link = _Link([writer, up_writer])
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, link), self._pump(up_reader, writer, link)
            )
        finally:
            self._links.discard(link)
            for w in link.writers:
                w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                while self.blackhole:
                    await asyncio.sleep(_POLL_S)
                if self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                limit = self.cut_after_bytes
                if limit is not None and link.nbytes + len(data) > limit:
                    writer.write(data[: max(0, limit - link.nbytes)])
                    self._reset(link)
                    return
                link.nbytes += len(data)
                self.counts["bytes"] += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            self._reset(link)
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()

    def _reset(self, link: _Link) -> None:
        if link in self._links:
            self.counts["cuts"] += 1
            self._links.discard(link)
        for writer in link.writers:
            _reset_writer(writer)


def _reset_writer(writer: asyncio.StreamWriter) -> None:
    """Closes with a TCP reset, not a FIN: the peer reads ECONNRESET."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    writer.transport.abort()
