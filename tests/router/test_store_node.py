"""The router and a real kvtier node (``kvtier serve``): the shared store's prefix."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from kvnode import start_node

from kvtier import KVLayout
from kvtier.config import RouterConfig, RouterModelConfig, RouterPodConfig
from kvtier.router.router import Router, RouteRequest, RouteResult
from kvtier.router.store_view import HttpStoreView

MODEL = "org/model"
LAYOUT = KVLayout(
    num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=16
)
TOKEN = "s3cret"


def route(token: str, node_http: str, tokens: list[int]) -> tuple[Router, RouteResult]:
    config = RouterConfig(
        block_tokens=16,
        models={MODEL: RouterModelConfig(layout_id=LAYOUT.layout_id)},
        store_timeout_seconds=5.0,
    )

    async def ask() -> tuple[Router, RouteResult]:
        router = Router(config, HttpStoreView(node_http, 5.0, token))
        router.add_pod("a", RouterPodConfig(model=MODEL))
        try:
            return router, await router.route(RouteRequest(MODEL, token_ids=tokens))
        finally:
            assert router.store is not None
            await router.store.close()

    return asyncio.run(ask())


@pytest.mark.timeout(120)
def test_the_nodes_prefix_counts_for_every_pod(tmp_path: Path) -> None:
    node = start_node(tmp_path, token=TOKEN)
    try:
        tokens = list(range(7 * 16))
        router, _ = route(TOKEN, node.http, tokens)
        keys = router.keys(RouteRequest(MODEL, token_ids=tokens))
        blocks = [np.ones(LAYOUT.block_shape, np.float16) for _ in keys[:5]]
        with node.client() as client:
            assert client.put(keys[:5], blocks, layout=LAYOUT)
        router, result = route(TOKEN, node.http, tokens)
        assert result.num_store_blocks == 5
        assert result.pods[0].blocks == {"GPU": 0, "CPU": 0, "store": 5}
        router, result = route("wrong", node.http, tokens)  # 401: counts nothing
        assert result.num_store_blocks == 0 and router.store_errors == 1
    finally:
        node.stop()
