"""Tests of the shared-FS tier: files in a directory that several nodes share."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.errors import ConfigError, LayoutError, StorageError, StoreClosedError
from kvtier.layout import KVLayout
from kvtier.tiers._record import HEADER_BYTES, RecordHeader
from kvtier.tiers.shared_fs import STALE_PART_S, SharedFSTier

LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=4, head_dim=8, dtype="float16", block_tokens=16
)
NBYTES = 4096
NUM_PROC_BLOCKS = 300
PROC_NBYTES = 16384


def key_of(i: int) -> BlockKey:
    return BlockKey(xxhash.xxh3_128_digest(i.to_bytes(8, "little")))


def block_of(i: int, nbytes: int = NBYTES) -> np.ndarray:
    """Deterministic, incompressible content for block ``i``."""
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)


def kv_block_of(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.standard_normal(LAYOUT.block_shape).astype(np.float16)


def block_path(root: Path, key: BlockKey) -> Path:
    h = key.hex()
    return root / "blocks" / h[:2] / h[2:4] / f"{h}.kvb"


def put(
    tier: SharedFSTier, i: int, nbytes: int = NBYTES, expire_at: float = math.inf
) -> bool:
    meta = BlockMeta(nbytes, expire_at=expire_at)
    [ok] = tier.write([(key_of(i), block_of(i, nbytes), meta)])
    return ok


def read(tier: SharedFSTier, i: int, nbytes: int = NBYTES, **kw: float) -> bool:
    out = np.zeros(nbytes, np.uint8)
    hit = tier.read_into(key_of(i), out.data, **kw)
    if hit:
        np.testing.assert_array_equal(out, block_of(i, nbytes))
    return hit


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# -- basics -----------------------------------------------------------------------


def test_round_trip_numpy_blocks(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    blocks = [kv_block_of(i) for i in range(3)]
    meta = BlockMeta(LAYOUT.block_bytes)
    items = [(key_of(i), block, meta) for i, block in enumerate(blocks)]
    assert tier.write(items) == [True] * 3

    for i, block in enumerate(blocks):
        out = np.empty(LAYOUT.block_shape, np.float16)
        assert tier.read_into(key_of(i), out.data)
        np.testing.assert_array_equal(out, block)
    assert block_path(tmp_path, key_of(0)).stat().st_size == (
        HEADER_BYTES + LAYOUT.block_bytes
    )
    assert listing(tmp_path / "tmp") == []
    stats = tier.stats()
    assert (stats.reads, stats.hits, stats.misses) == (3, 3, 0)
    file_bytes = HEADER_BYTES + LAYOUT.block_bytes
    assert stats.bytes_written == stats.bytes_read == 3 * file_bytes


def test_contains_and_miss(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    assert put(tier, 1)
    assert tier.contains([key_of(1), key_of(2)]) == [True, False]
    assert not read(tier, 2)
    assert tier.stats().misses == 1


def test_delete(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    for i in range(3):
        assert put(tier, i)
    assert tier.delete([key_of(0), key_of(1), key_of(9)]) == 2
    assert tier.contains([key_of(0), key_of(1), key_of(2)]) == [False, False, True]
    assert not read(tier, 0)
    assert read(tier, 2)
    assert tier.delete([key_of(0)]) == 0


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compression_round_trip(tmp_path: Path, codec: str) -> None:
    tier = SharedFSTier(tmp_path, compression=codec)
    compressible = np.tile(np.arange(64, dtype=np.uint8), NBYTES // 64)
    items = [
        (key_of(0), compressible, BlockMeta(NBYTES)),
        (key_of(1), block_of(1), BlockMeta(NBYTES)),
    ]
    assert tier.write(items) == [True, True]

    out = np.zeros(NBYTES, np.uint8)
    assert tier.read_into(key_of(0), out.data)
    np.testing.assert_array_equal(out, compressible)
    assert read(tier, 1)
    packed = block_path(tmp_path, key_of(0)).read_bytes()
    assert RecordHeader.unpack(packed).codec_id != 0
    assert len(packed) < HEADER_BYTES + NBYTES
    raw = RecordHeader.unpack(block_path(tmp_path, key_of(1)).read_bytes())
    assert raw.codec_id == 0  # incompressible KV is kept raw


def test_wrong_block_size_raises_before_writing(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    items = [
        (key_of(0), block_of(0), BlockMeta(NBYTES)),
        (key_of(1), block_of(1), BlockMeta(NBYTES + 1)),
    ]
    with pytest.raises(LayoutError, match="meta says"):
        tier.write(items)
    assert list(tier.keys()) == []


def test_meta_from_header(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    t0 = time.time()
    assert put(tier, 0)
    assert put(tier, 1, expire_at=t0 + 100)
    assert tier.meta(key_of(0)) == BlockMeta(NBYTES, expire_at=math.inf)
    assert tier.meta(key_of(1)) == BlockMeta(NBYTES, expire_at=t0 + 100)
    assert tier.meta(key_of(1), now=t0 + 101) is None
    assert tier.meta(key_of(2)) is None


def test_keys_walks_the_tree(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    for i in range(5):
        assert put(tier, i)
    (tmp_path / "blocks" / "ab" / "cd").mkdir(parents=True)
    (tmp_path / "blocks" / "ab" / "cd" / "README").write_text("not a block")
    assert sorted(tier.keys()) == sorted(key_of(i) for i in range(5))


def test_existing_block_is_not_rewritten(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    assert put(tier, 0)
    inode = block_path(tmp_path, key_of(0)).stat().st_ino
    assert put(tier, 0)
    assert block_path(tmp_path, key_of(0)).stat().st_ino == inode
    assert tier.stats().bytes_written == HEADER_BYTES + NBYTES


def test_expired_block_is_replaced_by_a_new_write(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    assert put(tier, 0, expire_at=time.time() - 1)
    assert not read(tier, 0)
    assert put(tier, 0)
    assert read(tier, 0)
    assert tier.meta(key_of(0)) == BlockMeta(NBYTES)


def test_read_into_wrong_size_is_a_miss_not_corruption(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    assert put(tier, 0)
    assert not tier.read_into(key_of(0), memoryview(bytearray(NBYTES - 1)))
    assert tier.stats().num_corrupt == 0
    assert read(tier, 0)


def test_read_into_rejects_unusable_destinations(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    assert put(tier, 0)
    with pytest.raises(LayoutError, match="writable"):
        tier.read_into(key_of(0), memoryview(bytes(NBYTES)))
    strided = np.zeros((2, NBYTES), np.uint8)[:, ::2]
    with pytest.raises(LayoutError, match="contiguous"):
        tier.read_into(key_of(0), strided.data)


def test_read_hit_refreshes_mtime_at_most_once_per_interval(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path, touch_interval_s=60.0)
    assert put(tier, 0)
    path = block_path(tmp_path, key_of(0))
    old_ns = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old_ns, old_ns))
    assert read(tier, 0)
    assert path.stat().st_mtime_ns > old_ns + 3000 * 10**9

    recent_ns = time.time_ns() - 10 * 10**9
    os.utime(path, ns=(recent_ns, recent_ns))
    assert read(tier, 0)
    assert path.stat().st_mtime_ns == recent_ns


# -- several nodes ----------------------------------------------------------------


def test_two_nodes_share_one_directory(tmp_path: Path) -> None:
    node_a, node_b = SharedFSTier(tmp_path), SharedFSTier(tmp_path)
    assert put(node_a, 0)
    assert node_b.contains([key_of(0)]) == [True]
    assert read(node_b, 0)
    assert node_b.delete([key_of(0)]) == 1
    assert not read(node_a, 0)
    assert node_a.contains([key_of(0)]) == [False]
    assert node_a.stats().misses == 1


def _writer_main(root: str, order: str, handshake: str) -> None:
    """A writer node in another process (run by the tests below)."""
    indices = list(range(NUM_PROC_BLOCKS))
    if order == "reverse":
        indices.reverse()
    results: list[bool] = []
    with SharedFSTier(root) as tier:
        for n, i in enumerate(indices):
            if handshake == "yes" and n == NUM_PROC_BLOCKS // 2:
                print("half", flush=True)
                sys.stdin.readline()
            meta = BlockMeta(PROC_NBYTES)
            results += tier.write([(key_of(i), block_of(i, PROC_NBYTES), meta)])
    print(json.dumps(results), flush=True)


def _start_writer(root: Path, order: str, handshake: str) -> subprocess.Popen[str]:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_shared_fs as t; "
        "t._writer_main(*sys.argv[2:])"
    )
    here = str(Path(__file__).parent)
    return subprocess.Popen(
        [sys.executable, "-c", code, here, str(root), order, handshake],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _poll_all(tier: SharedFSTier, seen: set[int]) -> None:
    """Reads every key once; any hit must carry exactly the right bytes."""
    for i in range(NUM_PROC_BLOCKS):
        if read(tier, i, PROC_NBYTES):
            seen.add(i)


def _finish(proc: subprocess.Popen[str]) -> list[bool]:
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    results: list[bool] = json.loads(stdout.splitlines()[-1])
    return results


def test_reader_process_sees_only_complete_blocks(tmp_path: Path) -> None:
    writer = _start_writer(tmp_path, "forward", "yes")
    reader = SharedFSTier(tmp_path)
    seen: set[int] = set()
    assert writer.stdout is not None and writer.stdin is not None
    assert writer.stdout.readline() == "half\n"
    _poll_all(reader, seen)
    assert seen == set(range(NUM_PROC_BLOCKS // 2))

    writer.stdin.write("go\n")
    writer.stdin.flush()
    while writer.poll() is None:  # read while the writer writes the second half
        _poll_all(reader, seen)
    assert _finish(writer) == [True] * NUM_PROC_BLOCKS
    _poll_all(reader, seen)
    assert seen == set(range(NUM_PROC_BLOCKS))
    assert reader.stats().num_corrupt == 0
    assert listing(tmp_path / "tmp") == []


def test_writer_processes_racing_on_the_same_keys(tmp_path: Path) -> None:
    writers = [_start_writer(tmp_path, order, "no") for order in ("forward", "reverse")]
    reader = SharedFSTier(tmp_path)
    seen: set[int] = set()
    while any(w.poll() is None for w in writers):
        _poll_all(reader, seen)
    for writer in writers:
        assert _finish(writer) == [True] * NUM_PROC_BLOCKS
    _poll_all(reader, seen)
    assert seen == set(range(NUM_PROC_BLOCKS))
    assert len(list(reader.keys())) == NUM_PROC_BLOCKS
    assert reader.stats().num_corrupt == 0
    assert listing(tmp_path / "tmp") == []


# -- corruption -------------------------------------------------------------------


def _torn(data: bytes) -> bytes:
    return data[: HEADER_BYTES + (len(data) - HEADER_BYTES) // 2]


def _payload_flip(data: bytes) -> bytes:
    at = HEADER_BYTES + (len(data) - HEADER_BYTES) // 2
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _header_flip(data: bytes) -> bytes:
    return data[:30] + bytes([data[30] ^ 0x80]) + data[31:]


def _extended(data: bytes) -> bytes:
    return data + b"trailing junk"


@pytest.mark.parametrize("damage", [_torn, _payload_flip, _header_flip, _extended])
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_corrupt_file_is_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, codec: str
) -> None:
    tier = SharedFSTier(tmp_path, compression=codec)
    compressible = np.tile(np.arange(128, dtype=np.uint8), NBYTES // 128)
    assert tier.write([(key_of(0), compressible, BlockMeta(NBYTES))]) == [True]
    path = block_path(tmp_path, key_of(0))
    assert callable(damage)
    path.write_bytes(damage(path.read_bytes()))  # a broken write at the final path

    with caplog.at_level(logging.WARNING, logger="kvtier.tiers.shared_fs"):
        assert not tier.read_into(key_of(0), memoryview(bytearray(NBYTES)))
    assert not path.exists()
    assert len(listing(tmp_path / "quarantine")) == 1
    assert tier.stats().num_corrupt == 1
    assert key_of(0).hex() in caplog.text
    assert tier.write([(key_of(0), compressible, BlockMeta(NBYTES))]) == [True]
    assert tier.read_into(key_of(0), memoryview(bytearray(NBYTES)))


def test_file_holding_another_key_is_quarantined(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    assert put(tier, 1)
    wrong = block_path(tmp_path, key_of(0))
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_bytes(block_path(tmp_path, key_of(1)).read_bytes())
    assert not read(tier, 0)
    assert tier.stats().num_corrupt == 1
    assert not wrong.exists()
    assert read(tier, 1)


def test_check_reports_then_fixes(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    for i in range(2):
        assert put(tier, i)
    torn = block_path(tmp_path, key_of(1))
    torn.write_bytes(_torn(torn.read_bytes()))
    misplaced = tmp_path / "blocks" / "00" / "00" / block_path(tmp_path, key_of(0)).name
    misplaced.parent.mkdir(parents=True, exist_ok=True)
    misplaced.write_bytes(block_path(tmp_path, key_of(0)).read_bytes())
    stray = block_path(tmp_path, key_of(0)).parent / "notes.txt"
    stray.write_text("hello")
    part = tmp_path / "tmp" / "deadhost-1-00.part"
    part.write_bytes(b"x")
    old = time.time() - STALE_PART_S - 60
    os.utime(part, (old, old))

    report = tier.check()
    assert report.num_checked == 4
    assert {path for path, _reason in report.bad} == {
        str(torn),
        str(misplaced),
        str(stray),
    }
    assert report.stale_parts == (str(part),)
    assert not report.ok and not report.fixed
    assert torn.exists() and part.exists()

    fixed = tier.check(fix=True)
    assert fixed.fixed and len(fixed.bad) == 3
    assert len(listing(tmp_path / "quarantine")) == 3
    assert not part.exists()
    after = tier.check()
    assert after.ok and after.num_checked == 1 and after.stale_parts == ()
    assert read(tier, 0)


# -- sweep ------------------------------------------------------------------------


def test_sweep_removes_expired_blocks(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    t0 = time.time()
    for i in range(6):
        assert put(tier, i, expire_at=t0 + 100 if i < 3 else math.inf)
    assert not read(tier, 0, now=t0 + 200)
    assert read(tier, 0, now=t0)

    report = tier.sweep(now=t0 + 200)
    assert (report.num_scanned, report.num_expired, report.num_evicted) == (6, 3, 0)
    assert report.bytes_freed == 3 * (HEADER_BYTES + NBYTES)
    assert sorted(tier.keys()) == sorted(key_of(i) for i in range(3, 6))


# Block i's position in recency order: block 7 was used longest ago, block 4 last.
LRU_ORDER = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
FILE_BYTES = HEADER_BYTES + NBYTES  # 4160; 10 files = 41,600 bytes


def _age_files(root: Path) -> None:
    base = time.time() - 10_000
    for age_rank, i in enumerate(LRU_ORDER):
        mtime = base + age_rank
        os.utime(block_path(root, key_of(i)), (mtime, mtime))


def test_sweep_evicts_least_recently_used_first(tmp_path: Path) -> None:
    # 41,600 > 0.9 * 40,000 triggers eviction down to <= 32,000: three files go.
    tier = SharedFSTier(tmp_path, capacity_bytes=40_000)
    for i in range(10):
        assert put(tier, i)
    _age_files(tmp_path)

    report = tier.sweep()
    assert report.num_evicted == 3
    assert report.bytes_freed == 3 * FILE_BYTES
    assert report.bytes_remaining == 7 * FILE_BYTES
    remaining = set(tier.keys())
    assert {i for i in range(10) if key_of(i) not in remaining} == {7, 2, 9}


def test_read_hit_protects_a_block_from_eviction(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path, capacity_bytes=40_000)
    for i in range(10):
        assert put(tier, i)
    _age_files(tmp_path)
    assert read(tier, 7)  # the oldest becomes the newest

    tier.sweep()
    remaining = set(tier.keys())
    assert {i for i in range(10) if key_of(i) not in remaining} == {2, 9, 0}


def test_sweep_under_the_high_watermark_evicts_nothing(tmp_path: Path) -> None:
    # 41,600 <= 0.9 * 47,000 = 42,300
    tier = SharedFSTier(tmp_path, capacity_bytes=47_000)
    for i in range(10):
        assert put(tier, i)
    report = tier.sweep()
    assert (report.num_evicted, report.bytes_remaining) == (0, 10 * FILE_BYTES)
    assert len(list(tier.keys())) == 10


def test_sweep_skips_files_another_node_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = SharedFSTier(tmp_path, capacity_bytes=40_000)
    for i in range(10):
        assert put(tier, i)
    _age_files(tmp_path)
    other_node = SharedFSTier(tmp_path)
    real_unlink = os.unlink
    victim = str(block_path(tmp_path, key_of(2)))
    stolen: list[str] = []

    def unlink_after_the_other_node(path: str) -> None:
        if path == victim and not stolen:
            stolen.append(path)
            assert other_node.delete([key_of(2)]) == 1  # gets there first
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink_after_the_other_node)
    report = tier.sweep()
    monkeypatch.undo()
    assert stolen == [victim]
    assert report.num_evicted == 2  # block 2 counts for the watermark, not for us
    assert report.bytes_freed == 2 * FILE_BYTES
    assert report.bytes_remaining == 7 * FILE_BYTES
    remaining = set(tier.keys())
    assert {i for i in range(10) if key_of(i) not in remaining} == {7, 2, 9}


def test_sweep_removes_only_stale_parts(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    stale = tmp_path / "tmp" / "crashed-1-aa.part"
    fresh = tmp_path / "tmp" / "busy-2-bb.part"
    for path, age in ((stale, STALE_PART_S + 60), (fresh, 10.0)):
        path.write_bytes(b"partial")
        mtime = time.time() - age
        os.utime(path, (mtime, mtime))
    report = tier.sweep()
    assert report.num_stale_parts == 1
    assert listing(tmp_path / "tmp") == [fresh.name]


# -- write failures ---------------------------------------------------------------


def test_write_error_returns_false_and_keeps_existing_blocks(tmp_path: Path) -> None:
    tier = SharedFSTier(tmp_path)
    assert put(tier, 0)
    (tmp_path / "tmp").rmdir()
    (tmp_path / "tmp").write_text("not a directory")  # every new .part fails
    assert not put(tier, 1)
    assert tier.stats().write_failures == 1
    assert put(tier, 0)  # already stored: nothing to write
    assert read(tier, 0)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem that runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 4 MiB tmpfs needs root")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs as root: {mounted.stderr.strip()}")
    yield mount_point
    unmounted = subprocess.run(
        ["umount", str(mount_point)], capture_output=True, text=True
    )
    if unmounted.returncode != 0:  # e.g. a leaked descriptor keeps it busy
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        pytest.fail(f"cannot unmount the tmpfs: {unmounted.stderr.strip()}")


def test_enospc_on_a_full_filesystem(small_tmpfs: Path) -> None:
    nbytes = 256 * 1024
    tier = SharedFSTier(small_tmpfs, fsync=True)
    meta = BlockMeta(nbytes)
    results = tier.write([(key_of(i), block_of(i, nbytes), meta) for i in range(24)])

    num_stored = results.index(False)
    assert 8 <= num_stored < 16
    assert not any(results[num_stored:])
    assert listing(small_tmpfs / "tmp") == []
    assert tier.stats().write_failures == 24 - num_stored
    for i in range(num_stored):
        assert read(tier, i, nbytes)
    assert tier.contains([key_of(num_stored)]) == [False]

    assert tier.delete([key_of(0), key_of(1)]) == 2
    assert put(tier, num_stored, nbytes)  # space freed is usable: nothing leaked
    assert read(tier, num_stored, nbytes)


# -- lifecycle and configuration --------------------------------------------------


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    with SharedFSTier(tmp_path) as tier:
        assert put(tier, 0)
    tier.close()
    calls = [
        lambda: tier.write([]),
        lambda: tier.read_into(key_of(0), memoryview(bytearray(NBYTES))),
        lambda: tier.contains([key_of(0)]),
        lambda: tier.meta(key_of(0)),
        lambda: tier.delete([key_of(0)]),
        tier.keys,
        tier.sweep,
        tier.check,
    ]
    for call in calls:
        with pytest.raises(StoreClosedError):
            call()
    assert block_path(tmp_path, key_of(0)).exists()


def test_uncreatable_directory_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(StorageError, match=str(tmp_path / "file" / "tier")):
        SharedFSTier(tmp_path / "file" / "tier")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"capacity_bytes": 0}, "capacity_bytes"),
        ({"compression": "snappy"}, "compression"),
        ({"high_watermark": 0.5, "low_watermark": 0.6}, "low_watermark"),
        ({"high_watermark": 1.5}, "high_watermark"),
        ({"touch_interval_s": -1.0}, "touch_interval_s"),
    ],
)
def test_invalid_settings_name_the_field(
    tmp_path: Path, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        SharedFSTier(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_name() -> None:
    assert SharedFSTier.name == "shared_fs"
