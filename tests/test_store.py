"""TieredStore: put / get / match across tiers, eviction, TTL, quotas, leases."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvnode import wait_until

import kvtier
from kvtier import KVLayout, Namespace, TieredStore, block_keys
from kvtier.config import Config
from kvtier.core.keys import BlockKey, KeyChain
from kvtier.errors import LayoutError, StoreClosedError

KiB = 1024
LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=4, head_dim=32, dtype="float16", block_tokens=16
)  # 16 KiB blocks
NS = Namespace("test-model", layout_id=LAYOUT.layout_id, block_tokens=16)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_store(
    tmp_path: Path, clock: Callable[[], float] | None = None, **overrides: Any
) -> TieredStore:
    settings = {
        "store.data_dir": str(tmp_path / "data"),
        "memory.capacity_bytes": 256 * KiB,
        "disk.capacity_bytes": 4096 * KiB,
        "memory.slab_bytes": 64 * KiB,
        **{k.replace("__", "."): v for k, v in overrides.items()},
    }
    config = Config().replace(settings)
    if clock is None:
        return TieredStore(config)
    return TieredStore(config, clock=clock)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TieredStore]:
    with make_store(tmp_path) as s:
        yield s


def blocks_for(keys: Any, seed: int = 0) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(LAYOUT.block_shape).astype(np.float16) for _ in keys]


def prompt(length_blocks: int, start: int = 0) -> KeyChain:
    return block_keys(NS, list(range(start, start + length_blocks * 16)))


def test_put_then_get_returns_the_same_bytes(store: TieredStore) -> None:
    keys = prompt(4)
    blocks = blocks_for(keys)
    result = store.put(keys, blocks, layout=LAYOUT)
    assert result and result.num_stored == 4
    got = store.get(keys, layout=LAYOUT)
    assert len(got) == 4
    for a, b in zip(got, blocks, strict=True):
        assert a.shape == LAYOUT.block_shape and np.array_equal(a, b)


def test_get_into_fills_caller_buffers_and_stops_at_the_first_miss(
    store: TieredStore,
) -> None:
    keys = prompt(5)
    blocks = blocks_for(keys)
    store.put(keys[:3], blocks[:3], layout=LAYOUT)
    outs = [np.zeros(LAYOUT.block_shape, dtype=np.float16) for _ in keys]
    assert store.get_into(keys, outs, layout=LAYOUT) == 3
    assert all(np.array_equal(outs[i], blocks[i]) for i in range(3))
    assert not outs[3].any()
    with pytest.raises(LayoutError, match="holds 8 bytes, the block has"):
        store.get_into(keys[:1], [bytearray(8)])


def test_match_prefix_window_and_contains(store: TieredStore) -> None:
    keys = prompt(6)
    blocks = blocks_for(keys)
    stored = [0, 1, 3, 4, 5]
    store.put([keys[i] for i in stored], [blocks[i] for i in stored], layout=LAYOUT)
    match = store.match(keys)
    assert match.num_blocks == 2 and match.tiers == ("memory", "memory")
    assert store.match(keys, window=3).num_blocks == 6
    assert store.match(keys, window=4).num_blocks == 2
    assert store.contains([keys[2], keys[5], BlockKey(b"x" * 16)]) == [
        False,
        True,
        False,
    ]


def test_layout_errors_name_expected_and_got(store: TieredStore) -> None:
    keys = prompt(1)
    with pytest.raises(LayoutError, match="float16.*got float32"):
        store.put(keys, [np.zeros(LAYOUT.block_shape, dtype=np.float32)], layout=LAYOUT)
    with pytest.raises(LayoutError, match=r"got shape \(1, 2, 3\)"):
        store.put(keys, [np.zeros((1, 2, 3), dtype=np.float16)], layout=LAYOUT)
    with pytest.raises(LayoutError, match="got 10 bytes"):
        store.put(keys, [b"0123456789"], layout=LAYOUT)
    with pytest.raises(LayoutError, match="1 keys but 2 blocks"):
        store.put(keys, blocks_for(range(2)), layout=LAYOUT)
    assert store.match(keys).num_blocks == 0


def test_put_beyond_capacity_is_false_and_the_store_is_intact(tmp_path: Path) -> None:
    with make_store(tmp_path, disk__enabled=False) as store:
        keys = prompt(2)
        blocks = blocks_for(keys)
        assert store.put(keys, blocks, layout=LAYOUT)
        huge = np.zeros(512 * KiB, dtype=np.uint8)  # larger than all of memory
        result = store.put([BlockKey(b"h" * 16)], [huge])
        assert not result and result.stored == (False,)
        assert store.stats().refused_blocks == 1
        assert all(
            np.array_equal(a, b)
            for a, b in zip(
                store.get(keys),
                map(lambda b: b.reshape(-1).view(np.uint8), blocks),
                strict=True,
            )
        )


def test_memory_only_store_evicts_in_policy_order(tmp_path: Path) -> None:
    with make_store(tmp_path, disk__enabled=False, memory__policy="lru") as store:
        chains = [prompt(1, start=1000 * i) for i in range(16)]
        for chain in chains:
            assert store.put(chain, blocks_for(chain), layout=LAYOUT)
        # 16 x 16 KiB = 256 KiB > 90% of 256 KiB: the oldest went first
        present = [store.match(chain).num_blocks for chain in chains]
        assert present[0] == 0 and present[-1] == 1
        assert store.stats().tiers["memory"].evictions == present.count(0)
        assert present == sorted(present)  # LRU: a prefix of the oldest is gone


def test_memory_evictions_are_demoted_to_disk_and_promoted_back(tmp_path: Path) -> None:
    with make_store(tmp_path, store__write_policy="write_back") as store:
        keys = prompt(40)  # 640 KiB through a 256 KiB memory
        blocks = blocks_for(keys)
        for i in range(0, 40, 4):
            assert store.put(keys[i : i + 4], blocks[i : i + 4], layout=LAYOUT)
        stats = store.stats()
        assert stats.demotions > 0 and stats.tiers["disk"].num_blocks == stats.demotions
        match = store.match(keys)
        assert match.num_blocks == 40 and match.tiers[0] == "disk"
        got = store.get(keys[:2], layout=LAYOUT)
        assert all(np.array_equal(a, b) for a, b in zip(got, blocks, strict=False))
        assert store.match(keys[:2]).tiers == ("memory", "memory")
        assert store.stats().promotions == 2


def test_write_through_is_on_disk_when_put_returns(tmp_path: Path) -> None:
    with make_store(tmp_path, store__write_policy="write_through") as store:
        keys = prompt(3)
        store.put(keys, blocks_for(keys), layout=LAYOUT)
        assert store.stats().tiers["disk"].num_blocks == 3
        assert store.stats().dirty_blocks == 0


def test_write_back_reaches_disk_only_on_eviction_or_close(tmp_path: Path) -> None:
    with make_store(tmp_path, store__write_policy="write_back") as store:
        keys = prompt(3)
        store.put(keys, blocks_for(keys), layout=LAYOUT)
        stats = store.stats()
        assert stats.tiers["disk"].num_blocks == 0 and stats.dirty_blocks == 3
    with make_store(tmp_path) as reopened:  # close() flushed them
        assert reopened.match(keys).tiers == ("disk",) * 3


def test_write_behind_survives_reopen(tmp_path: Path) -> None:
    keys = prompt(5)
    blocks = blocks_for(keys)
    with make_store(tmp_path) as store:
        store.put(keys, blocks, layout=LAYOUT)
        store.flush()
        assert store.stats().dirty_blocks == 0
    with make_store(tmp_path) as store:
        got = store.get(keys, layout=LAYOUT)
        assert len(got) == 5
        assert all(np.array_equal(a, b) for a, b in zip(got, blocks, strict=True))


def test_expired_blocks_are_never_returned(tmp_path: Path) -> None:
    clock = FakeClock()
    with make_store(tmp_path, clock, store__kv_expire_time=60) as store:
        keys = prompt(2)
        store.put(keys, blocks_for(keys), layout=LAYOUT)
        store.flush()
        clock.now += 59.9
        assert store.match(keys).num_blocks == 2
        clock.now += 0.1
        assert store.match(keys).num_blocks == 0
        assert store.get(keys) == []
        assert store.contains(list(keys)) == [False, False]
        assert store.expire() == 2
        stats = store.stats()
        assert stats.expired_blocks == 2 and stats.tiers["memory"].used_bytes == 0
        assert stats.tiers["disk"].num_blocks == 0
    with make_store(tmp_path, clock) as reopened:
        assert reopened.match(keys).num_blocks == 0


def test_quota_evicts_only_the_groups_own_blocks(tmp_path: Path) -> None:
    quotas = {"acme": {"memory_bytes": 64 * KiB}}
    with make_store(tmp_path, disk__enabled=False, store__quotas=quotas) as store:
        acme = Namespace(
            "m", layout_id=LAYOUT.layout_id, block_tokens=16, tenant="acme"
        )
        other = Namespace("m", layout_id=LAYOUT.layout_id, block_tokens=16, tenant="b")
        other_keys = block_keys(other, list(range(16 * 4)))
        assert store.put(other_keys, blocks_for(other_keys), layout=LAYOUT)
        acme_keys = block_keys(acme, list(range(16 * 8)))
        for i in range(8):
            assert store.put(acme_keys[i : i + 1], blocks_for([0]), layout=LAYOUT)
        assert store.match(other_keys).num_blocks == 4
        assert sum(store.contains(list(acme_keys))) <= 4
        assert store.stats().group_bytes["memory"]["acme"] <= 64 * KiB
        assert store.list(group="acme")
        assert all(info.group == "acme" for info in store.list(group="acme"))


def test_a_put_waits_for_the_writer_to_let_go_of_its_quota(tmp_path: Path) -> None:
    """All of a small group's blocks can be on their way to disk at once (leased by
    the writer, so not evictable): a put of that group waits for the writes instead
    of being refused."""
    from kvtier.chaos.faults import FaultPlan, faulty_tiers

    config = Config().replace(
        {
            "store.data_dir": str(tmp_path / "data"),
            "memory.capacity_bytes": 256 * KiB,
            "memory.slab_bytes": 64 * KiB,
            "store.quotas": {"g": {"memory_bytes": 32 * KiB}},
        }
    )
    tiers, (disk,) = faulty_tiers(config, FaultPlan())
    gate = threading.Semaphore(0)  # each release lets one of the writer's batches by
    real_write = disk.write

    def gated_write(items: Any) -> list[bool]:
        assert gate.acquire(timeout=30), "the test never let this write through"
        return real_write(items)

    disk.write = gated_write  # type: ignore[method-assign]
    ns = Namespace("q", layout_id=LAYOUT.layout_id, block_tokens=16, tenant="g")
    keys = block_keys(ns, list(range(16 * 3)))
    with TieredStore(config, tiers=tiers) as store:
        assert store.put(keys[:2], blocks_for(keys[:2]), layout=LAYOUT)
        wait_until(
            lambda: store._place.writes_in_flight == 2, 10, "the writer to take both"
        )
        waiting = threading.Event()
        real_wait = store._wait_for_writer

        def observed_wait(started: float) -> bool:
            waiting.set()
            return real_wait(started)

        store._wait_for_writer = observed_wait  # type: ignore[method-assign]
        # The writes go on once the put waits for them (the writer cannot finish
        # before the wait lets go of the store's lock, so no wake-up is lost).
        releaser = threading.Thread(target=lambda: waiting.wait(30) and gate.release())
        releaser.start()
        assert store.put(keys[2:], blocks_for(keys[2:]), layout=LAYOUT)
        releaser.join()
        assert waiting.is_set()  # it waited, and was not refused
        assert store.stats().group_bytes["memory"]["g"] <= 32 * KiB
        assert store.contains(list(keys)) == [True] * 3  # one went down to disk
        wait_until(
            lambda: store._place.writes_in_flight == 1, 10, "the writer to take one"
        )
        waiting.clear()
        huge = block_keys(ns, list(range(1000, 1016)))  # 64 KiB: over the quota
        assert store.reserve(huge, [64 * KiB]).slots[0].status == "refused"
        assert not waiting.is_set()  # refused at once, no waiting
        assert store._place.writes_in_flight == 1  # held at the gate
        gate.release()
        wait_until(lambda: store._place.writes_in_flight == 0, 10, "the writer")


def test_evicting_unwritten_blocks_keeps_the_writes_in_flight_count(
    tmp_path: Path,
) -> None:
    """Evicting a dirty block writes it first; the count of writes in flight must
    come back to zero (it went negative, and every refusal then waited). Write-back
    leaves every block dirty until evicted, so the evictions must demote."""
    with make_store(tmp_path, store__write_policy="write_back") as store:
        for i in range(40):
            chain = prompt(1, start=1000 * i)
            store.put(chain, blocks_for(chain), layout=LAYOUT)
        store.flush()
        assert store.stats().demotions > 0
        assert store._place.writes_in_flight == 0


def test_slots_ahead_come_from_free_room_only(tmp_path: Path) -> None:
    quotas = {"g": {"memory_bytes": 64 * KiB}}
    with make_store(
        tmp_path,
        disk__enabled=False,
        store__quotas=quotas,
        store__reserve_ahead_fraction=1.0,
    ) as store:
        ns = Namespace("a", layout_id=LAYOUT.layout_id, block_tokens=16, tenant="g")
        keys = block_keys(ns, list(range(16 * 4)))
        assert store.put(keys, blocks_for(keys), layout=LAYOUT)  # the whole quota
        assert not store.reserve_ahead([LAYOUT.block_bytes] * 4, "g").slots
        assert store.contains(list(keys)) == [True] * 4  # nothing evicted for them
        assert len(store.reserve_ahead([LAYOUT.block_bytes] * 4).slots) == 4


def fill_memory(store: TieredStore, count: int = 40) -> None:
    """Puts enough other blocks to evict everything unleased many times over."""
    for i in range(1, count):
        chain = prompt(1, start=1000 * i)
        store.put(chain, blocks_for(chain), layout=LAYOUT)


def test_a_leased_block_is_not_evicted_and_reads_in_place(tmp_path: Path) -> None:
    with make_store(tmp_path, disk__enabled=False, memory__policy="lru") as store:
        keys = prompt(2)
        blocks = blocks_for(keys)
        store.put(keys, blocks, layout=LAYOUT)
        with store.lease(keys) as lease:
            assert lease.num_blocks == 2 and lease.keys == tuple(keys)
            fill_memory(store)
            assert store.match(keys).num_blocks == 2
            view = lease.views[0]
            assert not view.flags.writeable
            assert np.array_equal(view, blocks[0].reshape(-1).view(np.uint8))
        fill_memory(store)
        assert store.match(keys).num_blocks == 0  # released: evictable again


def test_a_crashed_readers_lease_runs_out(tmp_path: Path) -> None:
    clock = FakeClock()
    with make_store(
        tmp_path, clock, disk__enabled=False, store__lease_seconds=5
    ) as store:
        keys = prompt(1)
        store.put(keys, blocks_for(keys), layout=LAYOUT)
        lease = store.lease(keys)  # never released: the reader "crashed"
        until_released = store.lease(keys, seconds=math.inf)
        fill_memory(store)
        assert store.match(keys).num_blocks == 1
        clock.now += 4.9
        assert not lease.expired()
        clock.now += 0.1
        assert lease.expired()  # what it copied from here on may be another block
        fill_memory(store)
        assert store.match(keys).num_blocks == 1  # the other reader holds it
        until_released.release()
        fill_memory(store)
        assert store.match(keys).num_blocks == 0
        assert not until_released.expired()
        lease.release()  # a late release after the slot was reused is harmless


def test_a_block_deleted_while_read_keeps_its_slot_until_released(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with make_store(tmp_path, clock, disk__enabled=False) as store:
        keys = prompt(1)
        store.put(keys, blocks_for(keys), layout=LAYOUT)
        used = store._memory.used_bytes
        lease = store.lease(keys)
        assert store.delete(keys) == 1
        assert store.match(keys).num_blocks == 0
        assert store._memory.used_bytes == used  # the reader still copies from it
        lease.release()
        assert store._memory.used_bytes == 0
        other = prompt(1, start=99)
        assert store.put(other, blocks_for(other), layout=LAYOUT)
        lease = store.lease(other)  # this reader never releases
        assert lease.num_blocks == 1
        store.delete(list(lease.keys))
        clock.now += store.config.store.lease_seconds
        store.expire()  # the sweep frees slots whose readers' leases ran out
        assert store._memory.used_bytes == 0


def test_an_unbounded_reader_that_released_does_not_pin_a_deleted_slot(
    tmp_path: Path,
) -> None:
    """A slot's hold lasts as long as the readers still holding it: a reader
    without a deadline that let go must not keep the slot of a deleted block from
    the sweep after a crashed reader's lease ran out."""
    clock = FakeClock()
    with make_store(tmp_path, clock, disk__enabled=False) as store:
        keys = prompt(1)
        store.put(keys, blocks_for(keys), layout=LAYOUT)
        crashed = store.lease(keys)  # never released
        store.lease(keys, seconds=math.inf).release()
        assert store.delete(keys) == 1
        clock.now += store.config.store.lease_seconds
        assert crashed.expired()
        store.expire()
        assert store._memory.used_bytes == 0
        assert store._place.held_slots == 0


def test_lease_promotes_disk_blocks_into_memory(tmp_path: Path) -> None:
    keys = prompt(2)
    blocks = blocks_for(keys)
    with make_store(tmp_path) as store:
        store.put(keys, blocks, layout=LAYOUT)
    with make_store(tmp_path) as store, store.lease(keys) as lease:
        assert lease.num_blocks == 2
        assert store.match(keys).tiers == ("memory", "memory")
        assert np.array_equal(lease.views[1], blocks[1].reshape(-1).view(np.uint8))


def test_delete_and_list(store: TieredStore) -> None:
    keys = prompt(3)
    store.put(keys, blocks_for(keys), layout=LAYOUT)
    infos = store.list()
    assert {info.key for info in infos} == set(keys)
    assert all(
        info.nbytes == LAYOUT.block_bytes and info.group == "default" for info in infos
    )
    assert store.delete([keys[1], BlockKey(b"z" * 16)]) == 1
    assert store.match(keys).num_blocks == 1
    assert len(store.list(limit=1)) == 1


def test_prefetch_promotes_disk_blocks(tmp_path: Path) -> None:
    keys = prompt(3)
    with make_store(tmp_path) as store:
        store.put(keys, blocks_for(keys), layout=LAYOUT)
    with make_store(tmp_path) as store:
        assert store.match(keys).tiers == ("disk",) * 3
        assert store.prefetch(keys).result(timeout=30) == 3
        assert store.match(keys).tiers == ("memory",) * 3
        assert store.stats().lookups == 0  # prefetches are not request lookups


def test_shared_fs_tier_serves_blocks_between_stores(tmp_path: Path) -> None:
    shared = str(tmp_path / "shared")
    keys = prompt(3)
    blocks = blocks_for(keys)
    with make_store(
        tmp_path / "a",
        remote__urls=f"file://{shared}",
        store__write_policy="write_through",
    ) as a:
        a.put(keys, blocks, layout=LAYOUT)
    with make_store(tmp_path / "b", remote__urls=f"file://{shared}") as b:
        match = b.match(keys)
        assert match.num_blocks == 3 and match.tiers == ("shared_fs",) * 3
        got = b.get(keys, layout=LAYOUT)
        assert all(np.array_equal(x, y) for x, y in zip(got, blocks, strict=True))
        assert b.match(keys).tiers == ("memory",) * 3


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreClosedError):
        store.match(prompt(1))


def test_async_store_is_the_same_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with kvtier.open_async(
            overrides={
                "store.data_dir": str(tmp_path / "d"),
                "memory.capacity_bytes": "1MiB",
            }
        ) as store:
            keys = prompt(2)
            blocks = blocks_for(keys)
            assert await store.put(keys, blocks, layout=LAYOUT)
            assert (await store.match(keys)).num_blocks == 2
            got = await store.get(keys, layout=LAYOUT)
            assert all(np.array_equal(a, b) for a, b in zip(got, blocks, strict=True))
            assert await store.prefetch(keys) == 2
            assert await store.delete(keys) == 2
            assert (await store.stats()).put_blocks == 2

    asyncio.run(scenario())


def test_torch_tensors_go_in_and_out(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    layout = KVLayout(
        num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=8
    )
    with make_store(tmp_path) as store:
        ns = Namespace("m", layout_id=layout.layout_id, block_tokens=8)
        keys = block_keys(ns, torch.arange(32))
        tensors = [torch.randn(layout.block_shape).to(torch.bfloat16) for _ in keys]
        assert store.put(keys, tensors, layout=layout)
        outs = [torch.empty(layout.block_shape, dtype=torch.bfloat16) for _ in keys]
        assert store.get_into(keys, outs, layout=layout) == 4
        assert all(torch.equal(a, b) for a, b in zip(outs, tensors, strict=True))


def test_two_phase_write_fills_the_arena_then_publishes(store: TieredStore) -> None:
    keys = prompt(3)
    blocks = blocks_for(keys)
    store.put(keys[:1], blocks[:1], layout=LAYOUT)
    reservation = store.reserve(keys, [LAYOUT.block_bytes] * 3)
    assert [s.status for s in reservation.slots] == ["stored", "reserved", "reserved"]
    assert store.match(keys).num_blocks == 1  # unseen until committed
    again = store.reserve(keys[1:2], [LAYOUT.block_bytes])  # a racing writer
    assert again.slots[0].status == "stored"
    for slot in reservation.reserved:
        block = blocks[list(keys).index(slot.key)]
        store.arena_view(slot.offset, slot.nbytes)[:] = block.reshape(-1).view(np.uint8)
    assert store.commit(reservation)
    got = store.get(keys, layout=LAYOUT)
    assert all(np.array_equal(a, b) for a, b in zip(got, blocks, strict=True))


def test_aborted_and_timed_out_reservations_give_their_slots_back(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with make_store(tmp_path, clock, disk__enabled=False) as store:
        keys = prompt(2)
        first = store.reserve(keys[:1], [LAYOUT.block_bytes])
        assert store._memory.used_bytes == LAYOUT.block_bytes
        store.abort(first)
        assert store._memory.used_bytes == 0
        assert not store.commit(first)  # committing an aborted one stores nothing
        dead = store.reserve(keys, [LAYOUT.block_bytes] * 2, timeout=10)
        clock.now += 10
        store.expire()  # the writer died: its slots come back
        assert store._memory.used_bytes == 0
        assert store.commit(dead).num_stored == 0
        assert store.match(keys).num_blocks == 0


def fill(store: TieredStore, slots: Any, blocks: list[Any]) -> None:
    for slot, block in zip(slots, blocks, strict=False):
        store.arena_view(slot.offset, slot.nbytes)[:] = block.reshape(-1).view(np.uint8)


def test_a_reservation_made_ahead_is_named_at_commit(tmp_path: Path) -> None:
    size = LAYOUT.block_bytes
    with make_store(
        tmp_path, disk__enabled=False, store__reserve_ahead_fraction=0.5
    ) as store:
        keys = prompt(4)
        blocks = blocks_for(keys)
        store.put(keys[1:2], blocks[1:2], layout=LAYOUT)  # stored already
        ahead = store.reserve_ahead([size] * 5, keys.quota_group)
        assert [s.key for s in ahead.slots] == [None] * 5
        assert store._memory.used_bytes == 6 * size
        assert store.match(keys).num_blocks == 0  # nothing named, nothing seen
        fill(store, ahead.slots, blocks)
        result = store.commit_as(ahead, keys, [size] * 4)
        assert result.stored == (True, True, True, True)
        # The duplicate's slot and the fifth (unused) one came back.
        assert store._memory.used_bytes == 4 * size
        got = store.get(keys, layout=LAYOUT)
        assert all(np.array_equal(a, b) for a, b in zip(got, blocks, strict=True))
        assert store.stats().open_reservations == 0


def test_a_reservation_made_ahead_refuses_what_it_was_not_made_for(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    size = LAYOUT.block_bytes
    with make_store(
        tmp_path, clock, disk__enabled=False, store__reserve_ahead_fraction=0.5
    ) as store:
        keys = prompt(2)
        ahead = store.reserve_ahead([size] * 2, "someone-else", timeout=10)
        with pytest.raises(LayoutError, match="quota group"):
            store.commit_as(ahead, keys, [size] * 2)
        with pytest.raises(LayoutError, match="holds"):
            store.commit_as(ahead, keys, [size, size // 2])
        with pytest.raises(LayoutError, match="slots"):
            store.commit_as(ahead, prompt(3), [size] * 3)
        keyed = store.reserve(prompt(1, start=500), [size])
        with pytest.raises(LayoutError, match="use commit"):
            store.commit_as(keyed, prompt(1, start=500), [size])
        store.abort(keyed)
        assert store._memory.used_bytes == 2 * size  # still open, untouched
        mine = store.reserve_ahead([size], keys.quota_group, timeout=10)
        store.commit(mine)  # committed without names: holds nothing
        assert store._memory.used_bytes == 2 * size
        clock.now += 10
        store.expire()  # the writer died: its slots come back
        assert store._memory.used_bytes == 0
        assert store.commit_as(ahead, keys, [size] * 2).num_stored == 0
        assert store.match(keys).num_blocks == 0
        assert store.stats().open_reservations == 0
        assert not store.reserve_ahead([1 << 30]).slots  # no room: nothing kept
        assert store.stats().open_reservations == 0


def test_reservations_made_ahead_stay_within_their_share(tmp_path: Path) -> None:
    size = LAYOUT.block_bytes  # 16 KiB of a 256 KiB tier
    with make_store(
        tmp_path, disk__enabled=False, store__reserve_ahead_fraction=0.25
    ) as store:
        first = store.reserve_ahead([size] * 3)
        second = store.reserve_ahead([size] * 3)
        assert (len(first.slots), len(second.slots)) == (3, 1)  # 64 KiB in all
        assert not store.reserve_ahead([size]).slots
        store.commit_as(first, prompt(2), [size] * 2)  # the share frees as used
        assert len(store.reserve_ahead([size] * 4).slots) == 3
    with make_store(
        tmp_path / "off", disk__enabled=False, store__reserve_ahead_fraction=0
    ) as store:
        assert not store.reserve_ahead([size]).slots


def test_reservation_beyond_capacity_is_refused(tmp_path: Path) -> None:
    with make_store(tmp_path, disk__enabled=False) as store:
        reservation = store.reserve([BlockKey(b"r" * 16)], [1 << 30])
        assert reservation.slots[0].status == "refused"
        assert not store.commit(reservation)


@pytest.mark.parametrize("hint", [False, True])
def test_finish_lets_a_finished_prompt_go_first(tmp_path: Path, hint: bool) -> None:
    clock = FakeClock()
    with make_store(tmp_path / str(hint), clock, disk__enabled=False) as store:
        older, finished = prompt(4), prompt(4, start=10_000)
        store.put(older, blocks_for(older), layout=LAYOUT)
        clock.now += 1
        store.put(finished, blocks_for(finished), layout=LAYOUT)
        if hint:
            store.finish(finished)  # that conversation is over
        clock.now += 1
        filler = prompt(10, start=20_000)  # 18 blocks of 16 KiB > 256 KiB: evicts
        store.put(filler, blocks_for(filler), layout=LAYOUT)
        kept = (store.match(older).num_blocks, store.match(finished).num_blocks)
    # 6 victims: leaf-first and oldest first without the hint (all of the older
    # prompt, then 2 of the other), the finished prompt first with it.
    assert kept == ((2, 0) if hint else (0, 2)), kept
