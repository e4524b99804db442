"""The store under crashes, corruption, full disks, and random operation sequences."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import TieredStore
from kvtier.config import Config
from kvtier.core.keys import BlockKey, Namespace, block_keys

KiB = 1024
NS = Namespace("faults", block_tokens=1)


def key_of(i: int) -> BlockKey:
    return block_keys(NS, [i])[0]


def payload(i: int, nbytes: int = 16 * KiB) -> np.ndarray[Any, Any]:
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)


def config(data_dir: Path, **settings: Any) -> Config:
    return Config().replace(
        {
            "store.data_dir": str(data_dir),
            "memory.capacity_bytes": 256 * KiB,
            "memory.slab_bytes": 64 * KiB,
            "disk.capacity_bytes": "64MiB",
            "disk.segment_bytes": "1MiB",
            **settings,
        }
    )


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from kvtier import TieredStore
    from kvtier.config import Config
    from kvtier.core.keys import Namespace, block_keys

    data_dir, policy = sys.argv[1], sys.argv[2]
    ns = Namespace("faults", block_tokens=1)
    config = Config().replace({
        "store.data_dir": data_dir, "store.write_policy": policy,
        "memory.capacity_bytes": 256 * 1024, "memory.slab_bytes": 64 * 1024,
        "disk.capacity_bytes": "64MiB", "disk.segment_bytes": "1MiB",
    })
    store = TieredStore(config)
    for i in range(100_000):
        block = np.random.default_rng(i).integers(0, 256, 16 * 1024, dtype=np.uint8)
        assert store.put([block_keys(ns, [i])[0]], [block])
        print(i, flush=True)
    """
)


def run_and_kill(data_dir: Path, policy: str, kill_after: int) -> int:
    """Starts a writer, SIGKILLs it once it reported ``kill_after`` puts."""
    last = -1
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(data_dir), policy],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            last = int(line)
            if last + 1 >= kill_after:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert last + 1 >= kill_after, "the writer died before it was killed"
    return last


def verify_after_crash(data_dir: Path, committed_through: int) -> int:
    """Every block that reads back is right; with write-through, every one is there."""
    with TieredStore(config(data_dir)) as store:
        found = 0
        for info in store.list():
            (got,) = store.get([info.key]) or [None]
            assert got is not None, "a listed block did not read back"
            found += 1
        for i in range(committed_through + 1):
            blocks = store.get([key_of(i)])
            if blocks:
                assert np.array_equal(blocks[0], payload(i))
        return found


@pytest.mark.parametrize("cycles", [3])
def test_sigkill_mid_put_loop_loses_nothing_committed(
    tmp_path: Path, cycles: int
) -> None:
    rng = random.Random(7)
    for cycle in range(cycles):
        data_dir = tmp_path / f"c{cycle}"
        last = run_and_kill(data_dir, "write_through", rng.randrange(20, 120))
        with TieredStore(config(data_dir)) as store:
            for i in range(last + 1):  # write_through: on disk when put returned
                blocks = store.get([key_of(i)])
                assert len(blocks) == 1, f"committed block {i} is missing"
                assert np.array_equal(blocks[0], payload(i)), f"block {i} is wrong"


@pytest.mark.slow
def test_sigkill_many_cycles_write_behind_and_through(tmp_path: Path) -> None:
    rng = random.Random(11)
    for cycle in range(60):
        policy = ("write_through", "write_behind")[cycle % 2]
        data_dir = tmp_path / "shared-dir"  # the same directory, killed again and again
        last = run_and_kill(data_dir, policy, rng.randrange(5, 200))
        verify_after_crash(data_dir, last)
        with TieredStore(config(data_dir)) as store:
            assert store._disk is not None and store._disk.check().ok


def test_write_behind_crash_serves_only_verified_blocks(tmp_path: Path) -> None:
    last = run_and_kill(tmp_path / "d", "write_behind", 150)
    assert verify_after_crash(tmp_path / "d", last) >= 0


def test_corrupt_block_on_disk_is_a_miss_quarantined_and_counted(
    tmp_path: Path,
) -> None:
    keys = [key_of(i) for i in range(4)]
    with TieredStore(config(tmp_path, **{"store.write_policy": "write_through"})) as s:
        assert s.put(keys, [payload(i) for i in range(4)])
    segment = next((tmp_path / "disk").rglob("*.seg"))
    data = bytearray(segment.read_bytes())
    second = data.find(payload(1).tobytes()[:64])
    data[second + 100] ^= 0xFF  # flip one payload byte of block 1
    segment.write_bytes(bytes(data))
    with TieredStore(config(tmp_path)) as store:
        got = store.get(keys)
        assert len(got) == 1 and np.array_equal(got[0], payload(0))
        stats = store.stats()
        assert stats.tiers["disk"].num_corrupt == 1
        assert store.match(keys).num_blocks == 1  # block 1 is gone, not half there
        assert store.contains(keys) == [True, False, True, True]


def test_full_disk_refuses_disk_writes_and_memory_keeps_serving(
    tmp_path: Path, mount_tmpfs: Callable[[str], Path]
) -> None:
    disk_dir = mount_tmpfs("2m")
    settings = {
        "store.write_policy": "write_through",
        "disk.path": str(disk_dir / "disk"),
        "memory.capacity_bytes": 4 * 1024 * KiB,
    }
    with TieredStore(config(tmp_path, **settings)) as store:
        keys = [key_of(i) for i in range(200)]  # 3.2 MiB: more than the disk holds
        for i, key in enumerate(keys):
            assert store.put([key], [payload(i)]), f"put {i} refused"
        stats = store.stats()
        assert stats.tiers["disk"].write_failures > 0
        assert 0 < stats.tiers["disk"].num_blocks < 200
        recent = keys[-50:]
        got = store.get(recent)
        assert len(got) == 50
        assert all(np.array_equal(g, payload(150 + j)) for j, g in enumerate(got))


OPS = st.lists(
    st.tuples(st.sampled_from(["put", "get", "delete", "reopen"]), st.integers(0, 40)),
    max_size=60,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=OPS, policy=st.sampled_from(["write_through", "write_behind", "write_back"]))
def test_store_behaves_like_a_dict(
    tmp_path: Path, ops: list[tuple[str, int]], policy: str
) -> None:
    """With a small memory over a large disk nothing is dropped: the store must
    answer exactly like a dict, through evictions, promotions and reopens."""
    data_dir = tmp_path / uuid.uuid4().hex  # a fresh store per example
    settings = {"store.write_policy": policy, "memory.policy": "s3fifo"}
    model: dict[int, int] = {}
    store = TieredStore(config(data_dir, **settings))
    try:
        for op, i in ops:
            key = key_of(i)
            if op == "put":
                assert store.put([key], [payload(i)])
                model[i] = i
            elif op == "delete":
                assert store.delete([key]) == (
                    1 if model.pop(i, None) is not None else 0
                )
            elif op == "reopen":
                store.close()
                store = TieredStore(config(data_dir, **settings))
            got = store.get([key])
            assert (len(got) == 1) == (i in model)
            if got:
                assert np.array_equal(got[0], payload(i))
        assert sorted(info.key for info in store.list()) == sorted(
            key_of(i) for i in model
        )
    finally:
        store.close()
