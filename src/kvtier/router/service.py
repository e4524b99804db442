"""``kvtier route``: the router as a service, started and stopped as one piece.

One asyncio loop runs everything: the ZMQ subscribers and their per-pod workers, the
expiry timer and the aiohttp server. :class:`RouterService` is what the command runs
and what tests start in-process on free ports (``listen`` port 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import zmq.asyncio
from aiohttp import web

from kvtier.config import Config
from kvtier.errors import ConfigError
from kvtier.router.http import make_app
from kvtier.router.ingest import Ingest
from kvtier.router.router import Router
from kvtier.router.store_view import EmbeddedStoreView, HttpStoreView, StoreView

__all__ = ["RouterService", "open_store_view", "serve"]

log = logging.getLogger(__name__)


def open_store_view(config: Config) -> StoreView | None:
    """The shared store ``router.store_url`` names, or None."""
    url = config.router.store_url
    if not url:
        return None
    if url == "embedded":
        from kvtier.store import TieredStore

        return EmbeddedStoreView(TieredStore(config))
    return HttpStoreView(
        url, config.router.store_timeout_seconds, config.router.store_token
    )


class RouterService:
    """The router, its ingestion and its HTTP API.

    Args:
        config: The whole configuration (``router`` section, and the store's for
            ``store_url: embedded``).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.router = Router(config.router, open_store_view(config))
        self._context = zmq.asyncio.Context()
        self.ingest = Ingest(self.router, self._context)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Starts following the configured pods and serving HTTP on ``listen``.

        Raises:
            ConfigError: ``listen`` or ``bind_endpoint`` cannot be bound.
        """
        self.ingest.start()
        self._runner = web.AppRunner(
            make_app(self.router, self.ingest), access_log=None
        )
        await self._runner.setup()
        host, _, port = self.config.router.listen.rpartition(":")
        site = web.TCPSite(self._runner, host, int(port))
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(
                f"router.listen: cannot listen on {host}:{port}: {exc.strerror}"
            ) from exc
        self.port = self._runner.addresses[0][1]
        log.info("kvtier route listening on %s:%d", host, self.port)

    async def stop(self) -> None:
        """Stops serving, following and the store view; idempotent."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.ingest.close()
        if self.router.store is not None:
            await self.router.store.close()
            self.router.store = None
        self._context.term()


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Runs the service until SIGINT or SIGTERM (or cancellation)."""
    service = RouterService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await service.start()
    print(f"kvtier route listening on port {service.port}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await service.stop()
