"""The engines' common backend (``Blocks``) against a real store: reads straight out
of leased arena slots, and what happens when a read outlives its lease."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvtier import KVLayout, Namespace, TieredStore, block_keys
from kvtier.config import Config
from kvtier.integrations.backend import Blocks

KiB = 1024
LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16
)
NS = Namespace("backend-test", layout_id=LAYOUT.layout_id, block_tokens=16)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def chain(blocks: int, start: int = 0) -> Any:
    return block_keys(NS, list(range(start, start + 16 * blocks)))


def data(count: int, seed: int) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(LAYOUT.block_shape).astype(np.float16) for _ in range(count)
    ]


def store_with(tmp_path: Path, clock: FakeClock) -> TieredStore:
    config = Config().replace(
        {
            "store.data_dir": str(tmp_path / "data"),
            "disk.enabled": False,
            "memory.capacity_bytes": 256 * KiB,
            "memory.slab_bytes": 64 * KiB,
            "memory.policy": "lru",
            "store.lease_seconds": 5.0,
        }
    )
    return TieredStore(config, clock=clock)


def test_reads_hand_over_the_leading_blocks_in_place(tmp_path: Path) -> None:
    with store_with(tmp_path, FakeClock()) as store:
        keys, blocks = chain(3), data(3, seed=1)
        assert store.put(keys[:2], blocks[:2], layout=LAYOUT)
        got: dict[int, bytes] = {}
        read = Blocks(store).read(
            keys, LAYOUT.block_bytes, lambda i, arr: got.update({i: arr.tobytes()})
        )
        assert read == 2
        assert got == {i: blocks[i].tobytes() for i in range(2)}


def test_a_read_that_outlives_its_lease_never_hands_over_another_block(
    tmp_path: Path,
) -> None:
    """The engine's copy out of the arena stalls past store.lease_seconds while
    puts reuse the slots: the read must not report blocks whose bytes it read from
    reused slots (it reads them again by copy, or misses)."""
    clock = FakeClock()
    with store_with(tmp_path, clock) as store:
        keys, blocks = chain(2), data(2, seed=2)
        assert store.put(keys, blocks, layout=LAYOUT)
        handed: dict[int, bytes] = {}
        stalled = False

        def sink(i: int, arr: np.ndarray[Any, Any]) -> None:
            nonlocal stalled
            if not stalled:  # the copy stalls past the lease; the slots are reused
                stalled = True
                clock.now += 5.0
                for n in range(1, 40):
                    other = chain(1, start=1000 * n)
                    store.put(other, data(1, seed=100 + n), layout=LAYOUT)
            handed[i] = arr.tobytes()  # the last one handed over for i stands

        read = Blocks(store).read(keys, LAYOUT.block_bytes, sink)
        assert stalled
        assert store.match(keys).num_blocks == 0  # the slots did go to other blocks
        assert read == 0  # a miss, not another block's bytes
        for i in range(read):
            assert handed[i] == blocks[i].tobytes()
