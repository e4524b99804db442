"""Faults injected into real tiers (disk, shared filesystem) under a real store.

Under every fault the store answers with the exact bytes or a miss, never an error and
never wrong bytes; once the fault ends, writes and reads go through again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvnode import wait_until

from kvtier import TieredStore
from kvtier.chaos.faults import FaultPlan, FaultyTier, faulty_tiers
from kvtier.config import Config
from kvtier.core.keys import BlockKey, Namespace, block_keys

KiB = 1024
NS = Namespace("faults-injected", block_tokens=1)
KEYS = block_keys(NS, list(range(400)))


def payload(i: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(i).integers(0, 256, 16 * KiB, dtype=np.uint8)


def config(tmp_path: Path, **settings: Any) -> Config:
    return Config().replace(
        {
            "store.data_dir": str(tmp_path / "data"),
            "memory.capacity_bytes": 512 * KiB,  # 32 blocks: most reads go to disk
            "memory.slab_bytes": 64 * KiB,
            "disk.capacity_bytes": "64MiB",
            "disk.segment_bytes": "1MiB",
            **settings,
        }
    )


def open_faulty(
    tmp_path: Path, plan: FaultPlan, **settings: Any
) -> tuple[TieredStore, list[FaultyTier]]:
    cfg = config(tmp_path, **settings)
    tiers, wrappers = faulty_tiers(cfg, plan)
    return TieredStore(cfg, tiers=tiers), wrappers


def put_all(store: TieredStore, numbers: range) -> None:
    for i in numbers:
        assert store.put([KEYS[i]], [payload(i)]), f"put {i} refused"


def check_reads(store: TieredStore, numbers: range) -> int:
    """Reads every block alone; each is exact or a miss. Returns the hits."""
    hits = 0
    for i in numbers:
        got = store.get([KEYS[i]])
        if got:
            assert np.array_equal(got[0], payload(i)), f"block {i} is wrong"
            hits += 1
    return hits


@pytest.fixture
def store_and_plan(tmp_path: Path) -> Iterator[tuple[TieredStore, FaultPlan, Any]]:
    plan = FaultPlan(seed=1)
    store, wrappers = open_faulty(
        tmp_path, plan, **{"store.write_policy": "write_through"}
    )
    yield store, plan, wrappers[0]
    store.close()


def test_eio_on_disk_reads_and_writes_gives_misses_never_errors(
    store_and_plan: tuple[TieredStore, FaultPlan, FaultyTier],
) -> None:
    store, plan, disk = store_and_plan
    plan.eio = 0.3
    for i in range(200):
        assert store.put([KEYS[i]], [payload(i)])  # memory takes it regardless
    hits = check_reads(store, range(200))
    assert disk.injected["eio"] > 20
    assert hits < 200  # blocks whose write failed were evicted from memory: misses
    stats = store.stats()
    assert stats.tiers["disk"].write_failures > 0
    assert stats.tiers["disk"].errors > 0  # failed reads, counted

    plan.clear()  # the fault ends: new blocks reach disk and read back from it
    written = store.stats().tiers["disk"].blocks_written
    put_all(store, range(200, 300))
    assert store.stats().tiers["disk"].blocks_written == written + 100
    assert check_reads(store, range(200, 300)) == 100


def test_enospc_refuses_disk_writes_until_space_comes_back(
    store_and_plan: tuple[TieredStore, FaultPlan, FaultyTier],
) -> None:
    store, plan, disk = store_and_plan
    plan.enospc = 1.0
    put_all(store, range(60))
    assert disk.injected["enospc"] == 60
    assert store.stats().tiers["disk"].num_blocks == 0
    assert check_reads(store, range(60)) <= 32  # only what memory still holds
    plan.clear()
    put_all(store, range(60, 120))
    assert store.stats().tiers["disk"].num_blocks == 60
    assert check_reads(store, range(60, 120)) == 60


def test_torn_writes_are_caught_by_checksums_and_quarantined(
    store_and_plan: tuple[TieredStore, FaultPlan, FaultyTier],
) -> None:
    store, plan, disk = store_and_plan
    plan.torn = 0.5
    put_all(store, range(150))
    plan.clear()
    torn = disk.injected["torn"]
    assert 40 < torn < 110
    hits = check_reads(store, range(150))
    stats = store.stats()
    # Memory holds the last ~32 blocks whole; every torn block read from disk is a
    # quarantined miss, every other one an exact hit.
    assert stats.tiers["disk"].num_corrupt + hits == 150
    assert torn - 32 <= stats.tiers["disk"].num_corrupt <= torn
    assert check_reads(store, range(150)) == hits  # quarantined: misses for good


def test_latency_on_disk_with_concurrent_readers_and_writers(tmp_path: Path) -> None:
    plan = FaultPlan(latency_s=0.002, eio=0.05, seed=3)
    store, wrappers = open_faulty(tmp_path, plan)  # write_behind: the writer lags
    errors: list[BaseException] = []

    def work(first: int) -> None:
        try:
            for i in range(first, first + 50):
                assert store.put([KEYS[i]], [payload(i)])
                check_reads(store, range(first, i + 1, 7))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(50 * t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert wrappers[0].injected["latency"] > 50 and wrappers[0].injected["eio"] > 0
    plan.clear()
    wait_until(lambda: store.stats().dirty_blocks == 0, 30, "write-behind to drain")
    hits = check_reads(store, range(200))
    assert hits > 150
    store.close()


def test_shared_fs_faults_mark_it_down_and_it_comes_back(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    settings = {
        "disk.enabled": False,
        "remote.urls": [f"file://{shared}"],
        "remote.retry_after": 0.05,
        "store.write_policy": "write_through",
    }
    plan = FaultPlan(seed=5)
    store, wrappers = open_faulty(tmp_path, plan, **settings)
    remote = wrappers[0]
    put_all(store, range(40))
    plan.eio = 1.0
    hits = check_reads(store, range(40))
    assert hits <= 32 and remote.injected["eio"] >= 1
    assert not store.stats().tiers["shared_fs"].healthy
    plan.clear()
    wait_until(
        lambda: check_reads(store, range(40)) == 40, 10, "the shared tier to come back"
    )
    assert store.stats().tiers["shared_fs"].healthy
    plan.torn = 1.0
    put_all(store, range(40, 80))
    plan.clear()
    assert remote.injected["torn"] == 40
    quarantine = shared / "quarantine"
    store.close()
    # A fresh store over the same directory: every torn file is a miss, quarantined.
    fresh = TieredStore(config(tmp_path / "again", **settings))
    try:
        assert check_reads(fresh, range(40, 80)) == 0
        assert check_reads(fresh, range(40)) == 40
        assert len(list(quarantine.iterdir())) == 40
    finally:
        fresh.close()


def test_a_wrapped_tier_serves_exactly_like_the_real_one(tmp_path: Path) -> None:
    """With no fault planned the wrapper is transparent (a control for the above)."""
    plan = FaultPlan()
    store, wrappers = open_faulty(tmp_path, plan)
    put_all(store, range(100))
    store.flush()
    assert check_reads(store, range(100)) == 100
    assert sum(wrappers[0].injected.values()) == 0
    keys: list[BlockKey] = list(KEYS[:100])
    assert store.contains(keys) == [True] * 100
    store.close()


def test_the_fault_harness_runs_every_phase_without_a_violation(
    tmp_path: Path,
) -> None:
    """``kvtier chaos faults``, small: every fault on both tiers, then the network."""
    from kvtier.chaos.faultrun import FAULTS, FaultRunConfig, run_faults

    report = run_faults(
        FaultRunConfig(blocks=40, network_s=2.0, directory=str(tmp_path))
    )
    assert report.violations == []
    for tier in ("disk", "shared_fs"):
        for fault in FAULTS:
            assert report.injected[f"{tier}/{fault}"] > 0, (tier, fault)
            assert report.recovered[f"{tier}/{fault}"] == 40, (tier, fault)
    assert report.injected["network"] > 0 and report.recovered["network"] > 0
