"""The client against a live node, over shared memory and over TCP."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np
import pytest
from kvnode import NodeProcess

from kvtier import KVLayout, Namespace, block_keys
from kvtier.client import AsyncClient, Client
from kvtier.core.keys import KeyChain
from kvtier.errors import LayoutError, RemoteError

LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16
)


def fresh_keys(count: int) -> KeyChain:
    ns = Namespace(f"m-{uuid.uuid4().hex}", layout_id=LAYOUT.layout_id, block_tokens=16)
    return block_keys(ns, list(range(16 * count)))


def blocks(count: int, seed: int = 0) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(LAYOUT.block_shape).astype(np.float16) for _ in range(count)
    ]


@pytest.fixture(params=["shared_memory", "tcp"])
def client(request: pytest.FixtureRequest, node: NodeProcess) -> Client:
    shm = request.param == "shared_memory"
    with node.client(shared_memory=shm) as c:
        assert c.shared_memory is shm
        yield c


def test_put_get_round_trip(client: Client) -> None:
    keys, data = fresh_keys(4), blocks(4)
    assert client.put(keys, data, layout=LAYOUT)
    got = client.get(keys, layout=LAYOUT)
    assert len(got) == 4
    assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))


def test_get_into_caller_buffers_stops_at_first_miss(client: Client) -> None:
    keys, data = fresh_keys(3), blocks(3)
    client.put(keys[:2], data[:2], layout=LAYOUT)
    outs = [np.zeros(LAYOUT.block_shape, np.float16) for _ in range(3)]
    assert client.get_into(keys, outs, layout=LAYOUT) == 2
    assert np.array_equal(outs[1], data[1]) and not outs[2].any()
    with pytest.raises(LayoutError):
        client.get_into(keys[:1], [np.zeros(7, np.uint8)])


def test_match_contains_delete_list_prefetch_stats(client: Client) -> None:
    keys, data = fresh_keys(4), blocks(4)
    client.put(keys, data, layout=LAYOUT)
    match = client.match(keys)
    assert match.num_blocks == 4 and set(match.tiers) <= {"memory", "disk"}
    assert client.match(keys, window=2).num_blocks == 4
    assert client.contains([keys[3], fresh_keys(1)[0]]) == [True, False]
    assert client.prefetch(keys) == 4
    listed = {info.key for info in client.list(limit=100_000)}
    assert set(keys) <= listed
    assert client.delete(keys[2:]) == 2
    assert client.match(keys).num_blocks == 2
    stats = client.stats()
    assert stats["ready"] and stats["stats"]["put_blocks"] >= 4


def test_node_errors_reach_the_client(client: Client) -> None:
    with pytest.raises(RemoteError, match="window must be positive"):
        client.match(fresh_keys(1), window=0)


def test_two_phase_write_and_lease_over_shared_memory(node: NodeProcess) -> None:
    keys, data = fresh_keys(2), blocks(2)
    with node.client(shared_memory=True) as client:
        reservation = client.reserve(keys, [LAYOUT.block_bytes] * 2)
        assert reservation.statuses == ["reserved", "reserved"]
        for view, block in zip(reservation.views, data, strict=True):
            assert view is not None
            view[:] = block.reshape(-1).view(np.uint8)
        assert client.match(keys).num_blocks == 0  # not published yet
        assert client.commit(reservation)
        lease = client.lease(keys)
        assert lease.num_blocks == 2
        assert np.array_equal(lease.views[1], data[1].reshape(-1).view(np.uint8))
        assert not lease.views[0].flags.writeable
        client.release(lease)
        aborted = client.reserve(fresh_keys(1), [LAYOUT.block_bytes])
        client.abort(aborted)
        with pytest.raises(RemoteError, match="no open reservation"):
            client.commit(aborted)


def test_two_phase_calls_need_the_same_host_path(node: NodeProcess) -> None:
    with (
        node.client(shared_memory=False) as client,
        pytest.raises(Exception, match="same-host"),
    ):
        client.reserve(fresh_keys(1), [16])


def test_async_client_pipelines_many_requests(node: NodeProcess) -> None:
    async def scenario() -> None:
        async with AsyncClient(node.address, shared_memory=False, pool_size=2) as c:
            keys, data = fresh_keys(8), blocks(8)
            assert await c.put(keys, data, layout=LAYOUT)
            answers = await asyncio.gather(
                *(c.match(keys[: i + 1]) for i in range(8)),
                *(c.contains([k]) for k in keys),
            )
            assert [a.num_blocks for a in answers[:8]] == list(range(1, 9))
            assert all(a == [True] for a in answers[8:])

    asyncio.run(scenario())


def test_torch_tensors_over_both_paths(client: Client) -> None:
    torch = pytest.importorskip("torch")
    layout = KVLayout(
        num_layers=1, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_tokens=16
    )
    keys = block_keys(
        Namespace(f"t-{uuid.uuid4().hex}", block_tokens=16), torch.arange(32)
    )
    tensors = [torch.randn(layout.block_shape).to(torch.bfloat16) for _ in keys]
    assert client.put(keys, tensors, layout=layout)
    outs = [torch.empty(layout.block_shape, dtype=torch.bfloat16) for _ in keys]
    assert client.get_into(keys, outs, layout=layout) == 2
    assert all(torch.equal(a, b) for a, b in zip(outs, tensors, strict=True))


@pytest.mark.gpu
def test_the_mapped_arena_is_pinned_for_async_gpu_copies(node: NodeProcess) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    keys, data = fresh_keys(2), blocks(2)
    with node.client(shared_memory=True, pin_memory=True) as client:
        assert client.aio._pinned_ptr is not None
        assert client.put(keys, data, layout=LAYOUT)
        lease = client.lease(keys)
        gpu = torch.from_numpy(lease.views[0]).to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(gpu.cpu(), torch.from_numpy(lease.views[0]))
        client.release(lease)


@pytest.mark.parametrize("shm", [False, True])
def test_finish_reaches_the_nodes_policy(node_factory: Any, shm: bool) -> None:
    node = node_factory(
        "memory.slab_bytes=64KiB", "disk.enabled=false", memory="256KiB"
    )
    with node.client(shared_memory=shm) as c:
        older, finished, filler = fresh_keys(4), fresh_keys(4), fresh_keys(10)
        assert c.put(older, blocks(4), layout=LAYOUT)
        assert c.put(finished, blocks(4), layout=LAYOUT)
        c.finish(finished)
        c.put(filler, blocks(10), layout=LAYOUT)  # 18 blocks of 16 KiB: evicts
        # Without the hint the older prompt would go first (see test_store.py).
        assert c.match(finished).num_blocks == 0
        assert c.match(older).num_blocks > 0


def test_calls_racing_to_connect_share_one_connection(node_factory: Any) -> None:
    """Requests that all start before the client is connected open one connection
    (each used to open its own, and all but the last leaked)."""
    node = node_factory()

    async def scenario() -> int:
        client = AsyncClient(node.address, pool_size=1)
        try:
            await asyncio.gather(*(client.ping() for _ in range(5)))
            return int((await client.stats())["connections"])
        finally:
            await client.close()

    assert asyncio.run(scenario()) == 1
