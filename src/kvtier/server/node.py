"""The node: a TieredStore served over TCP, a Unix socket, HTTP and gRPC.

``kvtier serve`` runs one :class:`Node`. It listens on:

* TCP (``server.port``): the binary protocol of :mod:`kvtier.protocol`, for clients
  anywhere; optionally over TLS and behind a shared token;
* an abstract Unix socket (``@kvtier-<random>``), for clients on the same host: the
  same protocol, plus the ``ARENA`` operation that hands over the memory arena's memfd
  so the client maps it and copies blocks in and out itself;
* HTTP (``server.http_port``): health, readiness, Prometheus metrics, JSON status and
  lookups (:mod:`kvtier.server.http`);
* gRPC (``server.grpc_port``): the store API for non-Python clients
  (:mod:`kvtier.server.grpc_service`).

The arena is a memfd: nothing is mapped page by page at start (a 16 GiB node is ready
in well under a second) and nothing is left in ``/dev/shm`` if the node is killed.
On SIGTERM the node stops accepting, lets in-flight requests finish for up to
``server.drain_seconds``, then flushes what write-behind has not yet written and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import uuid
from typing import TYPE_CHECKING, Any

from kvtier import protocol as proto
from kvtier._sockio import Channel, host_id
from kvtier.config import Config
from kvtier.errors import ConfigError
from kvtier.results import jsonable
from kvtier.server.metrics import NodeMetrics
from kvtier.server.session import Session
from kvtier.store import TieredStore

if TYPE_CHECKING:
    from kvtier.cluster.agent import ClusterAgent

__all__ = ["Node", "run_node"]

log = logging.getLogger(__name__)


class Node:
    """One kvtier node. ``await start()``, then ``await stop()``."""

    def __init__(self, config: Config) -> None:
        server = config.server
        if server.shared_memory and not config.memory.shared:
            config = config.replace({"memory.shared": True})
        self.config = config
        self.node_id = server.node_id or f"{socket.gethostname()}:{server.port}"
        self.store = TieredStore(config)
        self.metrics = NodeMetrics(self.store)
        self.unix_name = f"\0kvtier-{uuid.uuid4().hex}" if server.shared_memory else ""
        self.ready = False
        self.stopped = asyncio.Event()
        self._sessions: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._http: Any = None
        self._grpc: Any = None
        self.address: tuple[str, int] = (server.host, server.port)
        self.cluster: ClusterAgent | None = None
        if config.cluster.name:
            from kvtier.cluster.agent import ClusterAgent

            self.cluster = ClusterAgent(self)

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Opens every listener; the node serves once this returns."""
        server = self.config.server
        tls = _tls_context(server.tls_cert, server.tls_key)
        tcp = _listen_tcp(server.host, server.port)
        self.address = tcp.getsockname()[:2]
        # HTTP and gRPC first: once the protocol answers, every interface does.
        if server.http_port:
            from kvtier.server.http import start_http

            self._http = await start_http(self, server.host, server.http_port, tls)
        if server.grpc_port:
            from kvtier.server.grpc_service import start_grpc

            self._grpc = await start_grpc(self, server.host, server.grpc_port)
        if self.unix_name:
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(self.unix_name)
            unix.listen(128)
            await self._serve_socket(unix, None, local=True)
        await self._serve_socket(tcp, tls, local=False)
        self._housekeeping = asyncio.create_task(self._sweep_loop())
        if self.cluster is not None:
            await self.cluster.join()
        self.ready = True
        log.info(
            "kvtier node %s serving on %s:%d (http %d, grpc %d)",
            self.node_id,
            *self.address,
            server.http_port,
            server.grpc_port,
        )

    async def stop(self) -> None:
        """Stops accepting, drains in-flight requests, flushes and closes the store."""
        if not self.ready:
            return
        self.ready = False
        if self.cluster is not None:
            await self.cluster.leave()  # clients stop routing here first
        for listener in self._listeners:
            listener.close()
        for task in self._accept_tasks:
            task.cancel()
        for server in self._servers:
            server.close()
        if self._sessions:
            _, pending = await asyncio.wait(
                self._sessions, timeout=self.config.server.drain_seconds
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._housekeeping.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._http is not None:
            await self._http.cleanup()
        await asyncio.to_thread(self.store.close)  # flushes write-behind to disk
        self.stopped.set()
        log.info("kvtier node %s stopped", self.node_id)

    async def _sweep_loop(self) -> None:
        """Frequent housekeeping: expired leases and dead writers' reservations."""
        while True:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.store.expire)

    # ------------------------------------------------------------- serving

    async def _serve_socket(
        self, listener: socket.socket, tls: ssl.SSLContext | None, *, local: bool
    ) -> None:
        listener.setblocking(False)
        if tls is not None:
            server = await asyncio.start_server(
                self._on_tls_connection, sock=listener, ssl=tls
            )
            self._servers.append(server)
            return
        self._listeners.append(listener)  # closed by stop(); a Server closes its own
        self._accept_tasks.append(
            asyncio.create_task(self._accept_loop(listener, local=local))
        )

    async def _accept_loop(self, listener: socket.socket, *, local: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                log.warning("accept failed: %s", exc)
                continue
            peer = "unix" if local else f"{address[0]}:{address[1]}"
            self._start_session(Channel(sock=conn), peer, local=local)

    async def _on_tls_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        self._start_session(Channel(streams=(reader, writer)), str(peer), local=False)

    def _start_session(self, channel: Channel, peer: str, *, local: bool) -> None:
        if len(self._sessions) >= self.config.server.max_connections:
            log.warning(
                "refusing %s: %d connections already", peer, len(self._sessions)
            )
            channel.close()
            return
        task = asyncio.create_task(Session(self, channel, peer, local=local).serve())
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    # ------------------------------------------------------------- answers

    def hello_info(self) -> dict[str, Any]:
        return {
            "version": proto.VERSION,
            "node_id": self.node_id,
            "host_id": host_id(),
            "unix": self.unix_name[1:] if self.unix_name else "",
            "arena_bytes": self.store.arena_bytes,
            "max_payload_bytes": self.config.server.max_payload_bytes,
        }

    def status(self) -> dict[str, Any]:
        """The cache's status as JSON-able data (``/v1/status``, ``STATS``)."""
        stats = self.store.stats()
        return {
            "node_id": self.node_id,
            "ready": self.ready,
            "pid": os.getpid(),
            "connections": len(self._sessions),
            "tiers": self.store.tier_names,
            "stats": jsonable(stats),
            "hit_ratio": stats.hit_ratio,
            "cluster": self.cluster.view() if self.cluster is not None else None,
        }


def _listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"server.port {port} on {host}: {exc.strerror}") from exc
    sock.listen(1024)
    return sock


def _tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.tls_cert / tls_key cannot be loaded: {exc}") from exc
    return context


async def run_node(config: Config) -> None:
    """Runs a node until SIGTERM or SIGINT, then stops it gracefully."""
    import signal

    node = Node(config)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining")
    with contextlib.suppress(asyncio.CancelledError):
        await node.stop()
