"""The client against a live node, over shared memory and over TCP."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from typing import Any

import numpy as np
import pytest
from kvnode import NodeProcess, wait_until

from kvtier import KVLayout, Namespace, block_keys
from kvtier.client import AsyncClient, Client
from kvtier.core.keys import KeyChain
from kvtier.errors import LayoutError, RemoteError
from kvtier.protocol import Op

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


@pytest.mark.parametrize("shm", [False, True])
def test_the_blocking_client_waits_on_its_own_thread_in_order(
    node_factory: Any, shm: bool
) -> None:
    """The sync client reads its replies on the calling thread; replies to requests
    nobody waits for (a get's release) are read in order on the way, and an error
    reply leaves the connection usable."""
    node = node_factory("store.write_policy=write_back")  # the writer's leases count
    keys, data = fresh_keys(6), blocks(6)
    with node.client(shared_memory=shm, pool_size=1) as c:
        assert c.put(keys, data, layout=LAYOUT)
        for _ in range(20):  # over shared memory, each get posts a release
            got = c.get(keys, layout=LAYOUT)
            assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))
        with pytest.raises(RemoteError):
            c.get_blocks([b"short"])  # type: ignore[list-item]
        status = c.stats()
        (conn,) = c.aio._pool
        assert conn is not None and conn.blocking
        assert status["stats"]["held_slots"] == 0
        assert status["connections"] == 1
        assert c.match(keys).num_blocks == 6

    async def async_side() -> bool:
        async with AsyncClient(node.address, shared_memory=shm, pool_size=1) as a:
            await a.ping()
            (conn,) = a._pool
            return conn is not None and conn.blocking

    assert asyncio.run(async_side()) is False


def reserve_requests(node: NodeProcess) -> float:
    with urllib.request.urlopen(node.http + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith('kvtier_requests_total{op="reserve"}'):
            return float(line.split()[-1])
    return 0.0


def round_trips(c: Client, node: NodeProcess, keys: KeyChain, data: list[Any]) -> int:
    """Reserve requests a put made (0: it used the slots the last put reserved)."""
    before = reserve_requests(node)
    assert c.put(keys, data, layout=LAYOUT)
    got = c.get(keys, layout=LAYOUT)
    assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))
    return int(reserve_requests(node) - before)


def test_a_same_host_put_reserves_the_next_ones_slots(node_factory: Any) -> None:
    node = node_factory()
    with node.client(shared_memory=True, pool_size=1) as c:
        first = fresh_keys(4)
        assert round_trips(c, node, first, blocks(4)) == 1
        assert c.stats()["stats"]["open_reservations"] == 1  # the next put's slots
        assert round_trips(c, node, fresh_keys(4), blocks(4, 1)) == 0
        assert round_trips(c, node, first, blocks(4)) == 0  # stored: nothing changes
        assert round_trips(c, node, fresh_keys(2), blocks(2, 2)) == 0  # fewer fit
        # The next slots are the last put's size: a longer put reserves its own.
        assert round_trips(c, node, fresh_keys(4), blocks(4, 3)) == 1
        other = KVLayout(
            num_layers=1, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16
        )
        odd = [np.ones(other.block_shape, np.float16)] * 2
        assert c.put(fresh_keys(2), odd, layout=other)  # other sizes: reserves anew
        assert c.stats()["stats"]["open_reservations"] == 1  # the unused one went
    with node.client(shared_memory=False) as ops:
        assert ops.stats()["stats"]["open_reservations"] == 0  # gone with the client


@pytest.mark.parametrize("setting", ["reserve_ahead=False", "timeout"])
def test_a_put_without_usable_slots_ahead_reserves_its_own(
    node_factory: Any, setting: str
) -> None:
    """Slots ahead are off, or would run out too soon to use (the node takes them
    back after store.reservation_timeout, here the client's safety margin)."""
    if setting == "timeout":
        node = node_factory("store.reservation_timeout=5")
        options: dict[str, Any] = {}
    else:
        node = node_factory()
        options = {"reserve_ahead": False}
    with node.client(shared_memory=True, pool_size=1, **options) as c:
        for seed in range(3):
            assert round_trips(c, node, fresh_keys(3), blocks(3, seed)) == 1
        assert c.stats()["stats"]["open_reservations"] == 0


def test_bad_commits_of_slots_ahead_are_refused_and_change_nothing(
    node_factory: Any,
) -> None:
    node = node_factory()
    with node.client(shared_memory=True, pool_size=1) as c:
        assert c.put(fresh_keys(2), blocks(2))
        ahead = c.aio._ahead
        assert ahead is not None
        conn, rid = ahead.conn, ahead.reservation_id

        def commit(body: dict[str, Any]) -> Any:
            return c._run(conn.call(Op.COMMIT, {"id": rid, **body}, timeout=10))

        keys = fresh_keys(2)
        raw = [bytes(k) for k in keys]
        with pytest.raises(RemoteError, match="ahead must be a map"):
            commit({"keys": raw, "sizes": ahead.sizes, "ahead": "all of it"})
        with pytest.raises(RemoteError, match="holds"):
            commit({"keys": raw, "sizes": [ahead.sizes[0], 16], "chained": False})
        with pytest.raises(RemoteError, match="sizes"):
            commit({"keys": raw, "sizes": [1]})
        keyed = c.reserve(keys[:1], [ahead.sizes[0]])
        with pytest.raises(RemoteError, match="made ahead"):
            c._run(
                keyed.conn.call(
                    Op.COMMIT,
                    {"id": keyed.reservation_id, "keys": raw[:1], "sizes": [1]},
                    timeout=10,
                )
            )
        c.abort(keyed)
        assert c.stats()["stats"]["open_reservations"] == 1  # still there, unchanged
        assert c.match(keys).num_blocks == 0
        c._run(conn.call(Op.ABORT, {"id": rid}, timeout=10))
        assert c.stats()["stats"]["open_reservations"] == 0


def test_an_interrupted_blocking_call_drops_its_connection(node_factory: Any) -> None:
    """Ctrl-C halfway through a frame leaves the stream out of step: the connection
    must be dropped, or the next request's bytes are read as the rest of the last."""
    node = node_factory()
    keys, data = fresh_keys(2), blocks(2)
    with node.client(shared_memory=False, pool_size=1) as c:
        c.ping()
        (conn,) = c.aio._pool
        assert conn is not None
        real = conn.channel.send_now
        sent: list[int] = []

        def interrupted(buffers: Any, deadline: Any) -> None:
            real(buffers[:1], deadline)  # the header and body go out, not the payload
            sent.append(1)
            raise KeyboardInterrupt

        conn.channel.send_now = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            c.put(keys[:1], data[:1], layout=LAYOUT)
        assert sent and conn.closed
        assert c.put(keys, data, layout=LAYOUT)  # on a fresh connection
        got = c.get(keys, layout=LAYOUT)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))


def test_a_put_cancelled_mid_payload_stores_nothing_wrong(node: NodeProcess) -> None:
    """A task cancelled halfway through a put's frame (its payload half sent) must
    drop the connection: on it, the node would read the next request's bytes as the
    rest of that payload and store them under the cancelled put's key."""

    async def scenario() -> None:
        async with AsyncClient(node.address, shared_memory=False, pool_size=1) as c:
            await c.ping()
            (conn,) = c._pool
            assert conn is not None
            real = conn.channel.send
            stalled = asyncio.Event()

            async def half_sent(buffers: Any) -> None:
                await real(buffers[:1])  # the header and body go out, not the payload
                stalled.set()
                await asyncio.Event().wait()  # until cancelled

            conn.channel.send = half_sent  # type: ignore[method-assign]
            keys, data = fresh_keys(2), blocks(2, seed=3)
            put = asyncio.create_task(c.put(keys[:1], data[:1], layout=LAYOUT))
            await stalled.wait()
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await put
            assert conn.closed
            assert await c.put(keys[1:], data[1:], layout=LAYOUT)  # a new connection
            assert (await c.match(keys[:1])).num_blocks == 0
            (got,) = await c.get(keys[1:], layout=LAYOUT)
            assert np.array_equal(got, data[1])

    asyncio.run(scenario())


async def stored_on_one_connection(
    c: AsyncClient, count: int, seed: int
) -> tuple[KeyChain, list[np.ndarray[Any, Any]], Any]:
    """Fresh blocks put through ``c`` (a pool of one), and that one connection."""
    keys, data = fresh_keys(count), blocks(count, seed=seed)
    assert await c.put(keys, data, layout=LAYOUT)
    (conn,) = c._pool
    assert conn is not None
    return keys, data, conn


def test_a_read_cancelled_mid_reply_leaves_the_stream_in_step(
    node: NodeProcess,
) -> None:
    """A reader cancelled halfway through a reply leaves its place on the connection:
    the next reader goes on from it (the rest of the payload dropped, not written
    into the cancelled caller's buffers), and the connection stays usable."""

    async def scenario() -> None:
        async with AsyncClient(node.address, shared_memory=False, pool_size=1) as c:
            keys, data, conn = await stored_on_one_connection(c, 1, seed=4)
            real = conn.channel.recv_some
            stalled = asyncio.Event()

            async def half_read(view: memoryview) -> int:
                if stalled.is_set():
                    await asyncio.Event().wait()  # until cancelled
                if view.nbytes < LAYOUT.block_bytes:
                    return await real(view)
                stalled.set()  # the payload: some of it comes in, then a stall
                return await real(view[:100])

            conn.channel.recv_some = half_read  # type: ignore[method-assign]
            outs = [np.zeros(LAYOUT.block_shape, np.float16)]
            get = asyncio.create_task(c.get_into(keys, outs, layout=LAYOUT))
            await stalled.wait()
            while not conn._read_lock.locked():  # the reader is stalled in it
                await asyncio.sleep(0)
            get.cancel()
            with pytest.raises(asyncio.CancelledError):
                await get
            conn.channel.recv_some = real  # type: ignore[method-assign]
            outs[0][...] = 0
            (got,) = await c.get(keys, layout=LAYOUT)  # on the same connection
            assert np.array_equal(got, data[0])
            assert not conn.closed and c._pool == [conn]
            assert not outs[0].any()  # nothing more went into the cancelled buffer

    asyncio.run(scenario())


def test_cancelling_a_reader_spares_the_other_requests_in_flight(
    node: NodeProcess,
) -> None:
    """The caller reading replies for everyone is cancelled before its reply came:
    the next caller takes over reading, and the connection stays."""

    async def scenario() -> None:
        async with AsyncClient(node.address, shared_memory=False, pool_size=1) as c:
            keys, data, conn = await stored_on_one_connection(c, 2, seed=7)
            real = conn.channel.recv_some
            waiting, go = asyncio.Event(), asyncio.Event()

            async def held(view: memoryview) -> int:
                if not go.is_set():
                    waiting.set()
                    await go.wait()
                return await real(view)

            conn.channel.recv_some = held  # type: ignore[method-assign]
            first = asyncio.create_task(c.match(keys))
            await waiting.wait()  # it reads for everyone, and is held
            second = asyncio.create_task(c.contains(keys))
            while len(conn._waiting) < 2:  # both requests are on the wire
                await asyncio.sleep(0)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            go.set()
            assert await second == [True, True]
            assert not conn.closed and c._pool == [conn]

    asyncio.run(scenario())


def test_slots_ahead_of_a_cancelled_put_are_given_back(node_factory: Any) -> None:
    """The reply of a commit whose put was cancelled is read by the next reader; the
    slots it reserved ahead are aborted then, not held until their deadline."""
    node = node_factory()

    async def open_reservations(c: AsyncClient) -> int:
        return int((await c.stats())["stats"]["open_reservations"])

    async def scenario() -> None:
        async with AsyncClient(node.address, pool_size=1) as c:
            assert c.shared_memory
            assert await c.put(fresh_keys(2), blocks(2), layout=LAYOUT)
            assert await open_reservations(c) == 1  # the slots ahead
            (conn,) = c._pool
            assert conn is not None
            async with conn._read_lock:  # nobody reads the commit's reply yet
                put = asyncio.create_task(
                    c.put(fresh_keys(2), blocks(2), layout=LAYOUT)
                )
                while not conn._waiting:  # its commit is sent
                    await asyncio.sleep(0)
                put.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await put
            assert not conn.closed
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while await open_reservations(c) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert await open_reservations(c) == 0

    asyncio.run(scenario())


def test_a_same_host_read_that_outlives_its_lease_is_a_miss(node_factory: Any) -> None:
    """After its lease runs out a slot may hold another block: a copy out of it that
    ends later is thrown away (here every lease runs out at once)."""
    node = node_factory("store.lease_seconds=0.000001")
    keys, data = fresh_keys(2), blocks(2, seed=5)
    with node.client(shared_memory=True) as c:
        assert c.put(keys, data, layout=LAYOUT)
        assert c.match(keys).num_blocks == 2
        assert c.get(keys, layout=LAYOUT) == []
        outs = [np.zeros(LAYOUT.block_shape, np.float16) for _ in range(2)]
        assert c.get_into(keys, outs, layout=LAYOUT) == 0
    with node.client(shared_memory=False) as c:  # a TCP get holds them until sent
        got = c.get(keys, layout=LAYOUT)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))


def test_a_same_host_put_writes_only_in_the_first_half_of_its_reservation(
    node_factory: Any,
) -> None:
    """At its deadline the node gives a reservation's slots to other blocks, so a
    put that stalled past half of it writes no more (here every reservation runs
    out at once): nothing is stored, the slots are given back."""
    node = node_factory("store.reservation_timeout=0.000001")
    keys, data = fresh_keys(2), blocks(2, seed=6)
    with node.client(shared_memory=True, pool_size=1) as c:
        assert c.put(keys, data, layout=LAYOUT).stored == (False, False)
        assert c.match(keys).num_blocks == 0
        assert c.stats()["stats"]["open_reservations"] == 0  # aborted, in order
        reservation = c.reserve(keys, [LAYOUT.block_bytes] * 2)
        assert not reservation.writable()  # (closing the connection aborts it)
    with node.client(shared_memory=False) as c:  # a TCP put holds its own slots
        assert c.put(keys, data, layout=LAYOUT)
        got = c.get(keys, layout=LAYOUT)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))


@pytest.mark.parametrize("call", ["lease", "reserve"])
def test_a_lease_or_reservation_granted_to_a_cancelled_call_is_given_back(
    node_factory: Any, call: str
) -> None:
    """Its late reply is read by the next reader, which releases or aborts what it
    granted: the caller never saw it, so nothing else would before it leaves."""
    node = node_factory("store.write_policy=write_back")  # no writer's leases

    async def held(c: AsyncClient) -> tuple[int, int]:
        stats = (await c.stats())["stats"]
        return int(stats["held_slots"]), int(stats["open_reservations"])

    async def scenario() -> None:
        async with AsyncClient(node.address, pool_size=1, reserve_ahead=False) as c:
            keys, data = fresh_keys(2), blocks(2, seed=8)
            assert await c.put(keys, data, layout=LAYOUT)
            assert await held(c) == (0, 0)
            (conn,) = c._pool
            assert conn is not None
            async with conn._read_lock:  # nobody reads the reply yet
                task = asyncio.create_task(
                    c.lease(keys)
                    if call == "lease"
                    else c.reserve(fresh_keys(2), [LAYOUT.block_bytes] * 2)
                )
                while not conn._waiting:  # its request is sent
                    await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while await held(c) != (0, 0) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert await held(c) == (0, 0)
            assert not conn.closed

    asyncio.run(scenario())


def test_a_connection_stops_counting_leases_past_their_deadline(
    node_factory: Any,
) -> None:
    """server.max_open_per_connection counts what is open: leases a client never
    released (it lost track of them) stop counting once they have run out."""
    node = node_factory("server.max_open_per_connection=2", "store.lease_seconds=0.2")
    keys, data = fresh_keys(1), blocks(1, seed=9)
    with node.client(shared_memory=True, pool_size=1) as c:
        assert c.put(keys, data, layout=LAYOUT)
        first, _second = c.lease(keys), c.lease(keys)
        with pytest.raises(RemoteError, match="max_open_per_connection=2"):
            c.lease(keys)
        wait_until(lambda: first.expired(), 10, "the leases to run out")
        c.release(c.lease(keys))  # the two that ran out no longer count
