"""The shared store as the router sees it: embedded, and over the node's HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from kvtier import KVLayout, Namespace, TieredStore, block_keys
from kvtier.config import Config
from kvtier.core.keys import BlockKey, key_hex
from kvtier.errors import StorageError
from kvtier.router.store_view import EmbeddedStoreView, HttpStoreView

LAYOUT = KVLayout(
    num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=4
)
NS = Namespace("m", layout_id=LAYOUT.layout_id, block_tokens=4)
KEYS = list(block_keys(NS, list(range(40))))  # 10 blocks


def test_embedded_view_counts_the_leading_blocks_the_store_holds(
    tmp_path: Path,
) -> None:
    config = Config().replace(
        {"store.data_dir": str(tmp_path), "memory.capacity_bytes": 1 << 20}
    )
    store = TieredStore(config)
    blocks = [np.zeros(LAYOUT.block_shape, np.float16) for _ in KEYS[:6]]
    assert store.put(KEYS[:6], blocks, layout=LAYOUT)
    view = EmbeddedStoreView(store)

    async def check() -> None:
        assert await view.match(KEYS) == 6
        assert await view.match(KEYS[1:]) == 5
        await view.close()
        with pytest.raises(StorageError, match="could not match"):
            await view.match(KEYS)

    asyncio.run(check())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(handler: Handler) -> AsyncIterator[str]:
    """A stand-in node serving only POST /v1/match, on a free port."""
    app = web.Application()
    app.router.add_post("/v1/match", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def held(num: int) -> Handler:
    """A node holding the first ``num`` of KEYS, answering per the contract."""
    stored = {key_hex(k) for k in KEYS[:num]}

    async def match(request: web.Request) -> web.Response:
        body = await request.json()
        run = 0
        for key in body["keys"]:
            if key not in stored:
                break
            run += 1
        return web.json_response({"num_blocks": run, "tiers": ["memory"] * run})

    return match


def with_node(handler: Handler, check: Callable[[str], Awaitable[Any]]) -> None:
    async def main() -> None:
        async for url in serve(handler):
            await check(url)

    asyncio.run(main())


def test_http_view_sends_hex_keys_and_reads_num_blocks() -> None:
    async def check(url: str) -> None:
        view = HttpStoreView(url + "/", timeout_seconds=2.0)
        assert await view.match(KEYS) == 7
        assert await view.match(KEYS[:3]) == 3
        assert await view.match([BlockKey(b"\0" * 16)]) == 0
        await view.close()

    with_node(held(7), check)


async def status_500(request: web.Request) -> web.Response:
    return web.Response(status=500, text="boom")


async def not_json(request: web.Request) -> web.Response:
    return web.Response(text="<html>")


async def too_many(request: web.Request) -> web.Response:
    return web.json_response({"num_blocks": 99, "tiers": []})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(1)
    return web.json_response({"num_blocks": 0})


@pytest.mark.parametrize(
    "handler, message",
    [
        (status_500, "answered 500: boom"),
        (not_json, "did not answer"),
        (too_many, "expected num_blocks in"),
        (slow, "did not answer"),
    ],
)
def test_http_view_failures_are_storage_errors(handler: Handler, message: str) -> None:
    async def check(url: str) -> None:
        view = HttpStoreView(url, timeout_seconds=0.2)
        with pytest.raises(StorageError, match=message):
            await view.match(KEYS)
        await view.close()

    with_node(handler, check)


def test_http_view_to_nobody_is_a_storage_error() -> None:
    async def check() -> None:
        async for url in serve(held(0)):
            dead = url  # the port is free again once the node stops
        view = HttpStoreView(dead, timeout_seconds=1.0)
        with pytest.raises(StorageError, match="did not answer"):
            await view.match(KEYS)
        await view.close()

    asyncio.run(check())


def test_the_configured_store_url_picks_the_view(tmp_path: Path) -> None:
    from kvtier.router.service import open_store_view

    base = Config().replace(
        {"store.data_dir": str(tmp_path), "memory.capacity_bytes": 1 << 20}
    )
    assert open_store_view(base) is None
    http = open_store_view(base.replace({"router.store_url": "http://node:8780"}))
    assert isinstance(http, HttpStoreView)
    embedded = open_store_view(base.replace({"router.store_url": "embedded"}))
    assert isinstance(embedded, EmbeddedStoreView)
    asyncio.run(embedded.close())
