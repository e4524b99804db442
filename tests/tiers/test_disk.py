"""The local-SSD tier: persistence, corruption, capacity, a full disk, crashes."""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.errors import LayoutError, StorageError, StoreClosedError
from kvtier.tiers._record import HEADER_BYTES
from kvtier.tiers.disk import DiskTier

MiB = 2**20


def key_of(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def index_of(key: bytes) -> int:
    return int.from_bytes(key, "little")


def block_of(i: int, nbytes: int) -> np.ndarray:
    """Deterministic, incompressible content of block ``i`` (as the crash child)."""
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)


def put(tier: DiskTier, ids: range | list[int], nbytes: int, **meta: Any) -> list[bool]:
    items = [(key_of(i), block_of(i, nbytes), BlockMeta(nbytes, **meta)) for i in ids]
    return tier.write(items)


def read(
    tier: DiskTier, i: int, nbytes: int, now: float | None = None
) -> np.ndarray | None:
    out = np.empty(nbytes, dtype=np.uint8)
    return out if tier.read_into(key_of(i), memoryview(out), now) else None


def reads_back(tier: DiskTier, i: int, nbytes: int) -> bool:
    got = read(tier, i, nbytes)
    return got is not None and np.array_equal(got, block_of(i, nbytes))


def segment(root: Path, segment_id: int) -> Path:
    return root / "segments" / f"{segment_id:012d}.seg"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "disk"


@pytest.fixture
def tier(root: Path) -> Iterator[DiskTier]:
    with DiskTier(root, capacity_bytes=256 * MiB) as opened:
        yield opened


# -- round trip ------------------------------------------------------------------------


def test_round_trip_numpy_blocks(tier: DiskTier) -> None:
    shape = (4, 2, 16, 8, 8)
    blocks = [
        np.random.default_rng(i).random(shape).astype(np.float16) for i in range(8)
    ]
    nbytes = blocks[0].nbytes
    metas = [
        BlockMeta(nbytes, group="t1", parent=key_of(i - 1) if i else None)
        for i in range(8)
    ]
    items = [(key_of(i), blocks[i], metas[i]) for i in range(8)]
    assert tier.write(items) == [True] * 8

    for i, block in enumerate(blocks):
        out = np.empty(shape, dtype=np.float16)
        assert tier.read_into(key_of(i), memoryview(out))
        assert np.array_equal(out, block)
        assert tier.contains(key_of(i))
        assert tier.meta(key_of(i)) == metas[i]
    assert len(tier) == 8
    assert tier.stats().num_reads == 8
    assert tier.live_bytes == 8 * (HEADER_BYTES + nbytes)
    assert tier.used_bytes == tier.live_bytes

    assert tier.delete([key_of(1), key_of(2), key_of(99)]) == 2
    assert tier.delete([key_of(1)]) == 0
    assert not tier.contains(key_of(1))
    assert tier.meta(key_of(2)) is None
    assert tier.read_into(key_of(1), memoryview(np.empty(shape, np.float16))) is False
    assert len(tier) == 6
    assert tier.stats().num_corrupt == 0


def test_write_of_a_stored_key_does_not_rewrite(tier: DiskTier) -> None:
    assert put(tier, range(3), 4096) == [True] * 3
    used = tier.used_bytes
    stored = (key_of(0), block_of(0, 4096), BlockMeta(4096))
    new = (key_of(7), block_of(7, 4096), BlockMeta(4096))
    assert tier.write([stored, stored, new, new]) == [True] * 4  # each twice
    assert tier.used_bytes == used + HEADER_BYTES + 4096
    assert tier.stats().num_writes == 4


def test_bad_buffers_raise_layout_errors(tier: DiskTier) -> None:
    with pytest.raises(LayoutError):
        tier.write([(key_of(0), b"abc", BlockMeta(4))])
    assert len(tier) == 0
    put(tier, [0], 64)
    with pytest.raises(LayoutError):
        tier.read_into(key_of(0), memoryview(bytearray(63)))
    with pytest.raises(LayoutError):
        tier.read_into(key_of(0), memoryview(bytes(64)))


# -- persistence -----------------------------------------------------------------------


def test_reopen_reads_every_block_and_entries_keep_write_order(root: Path) -> None:
    expire = time.time() + 3600
    order = [5, 3, 9, 1, 7, 0, 8, 2]
    with DiskTier(root, capacity_bytes=64 * MiB, segment_bytes=MiB) as tier:
        for chunk in (order[:3], order[3:5], order[5:]):
            metas = [
                BlockMeta(
                    40_000,
                    group=f"g{i % 3}",
                    parent=key_of(i + 100),
                    expire_at=expire if i % 2 else math.inf,
                )
                for i in chunk
            ]
            blocks = [block_of(i, 40_000) for i in chunk]
            items = [(key_of(i), blocks[n], metas[n]) for n, i in enumerate(chunk)]
            assert tier.write(items) == [True] * len(chunk)
        before = list(tier.entries())
    with DiskTier(root, capacity_bytes=64 * MiB, segment_bytes=MiB) as tier:
        after = list(tier.entries())
        assert after == before
        assert [index_of(key) for key, _ in after] == order
        assert after[0][1] == BlockMeta(40_000, "g2", key_of(105), expire)
        assert after[5][1] == BlockMeta(40_000, "g0", key_of(100), math.inf)
        assert all(reads_back(tier, i, 40_000) for i in order)


def test_reopen_never_appends_to_an_old_segment(root: Path) -> None:
    with DiskTier(root, capacity_bytes=64 * MiB) as tier:
        put(tier, range(3), 1000)
    size = segment(root, 1).stat().st_size
    with DiskTier(root, capacity_bytes=64 * MiB) as tier:
        put(tier, range(3, 6), 1000)
        assert segment(root, 1).stat().st_size == size
        assert segment(root, 2).stat().st_size == 3 * (HEADER_BYTES + 1000)
        assert all(reads_back(tier, i, 1000) for i in range(6))


def test_a_directory_is_opened_once(root: Path) -> None:
    with (
        DiskTier(root, capacity_bytes=MiB),
        pytest.raises(StorageError, match="already open"),
    ):
        DiskTier(root, capacity_bytes=MiB)
    DiskTier(root, capacity_bytes=MiB).close()  # free again once closed


def test_a_bad_index_file_raises_storage_error(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "index.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StorageError, match="index.sqlite3"):
        DiskTier(root, capacity_bytes=MiB)


def test_a_wrong_schema_version_raises_storage_error(root: Path) -> None:
    DiskTier(root, capacity_bytes=MiB).close()
    with sqlite3.connect(root / "index.sqlite3") as db:
        db.execute("UPDATE meta SET value = '999' WHERE name = 'schema_version'")
    db.close()
    with pytest.raises(StorageError, match="schema version '999'"):
        DiskTier(root, capacity_bytes=MiB)


def test_closed_tier_raises(root: Path) -> None:
    tier = DiskTier(root, capacity_bytes=MiB)
    put(tier, [0], 100)
    tier.close()
    tier.close()  # idempotent
    for call in (
        lambda: tier.write([(key_of(1), block_of(1, 100), BlockMeta(100))]),
        lambda: tier.read_into(key_of(0), memoryview(bytearray(100))),
        lambda: tier.contains(key_of(0)),
        lambda: tier.delete([key_of(0)]),
        lambda: list(tier.entries()),
        lambda: tier.stats(),
        lambda: len(tier),
        lambda: tier.check(),
    ):
        with pytest.raises(StoreClosedError):
            call()


# -- compression -----------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compressed_round_trip(root: Path, codec: str) -> None:
    compressible = np.tile(np.arange(256, dtype=np.uint8), 400)
    nbytes = compressible.nbytes
    with DiskTier(root, capacity_bytes=64 * MiB, compression=codec) as tier:
        assert tier.write([(key_of(0), compressible, BlockMeta(nbytes))]) == [True]
        compressed = tier.live_bytes
        assert compressed < nbytes // 4
        assert put(tier, [1], nbytes) == [True]  # random bytes do not compress
        assert tier.live_bytes == compressed + HEADER_BYTES + nbytes  # stored raw
    with DiskTier(root, capacity_bytes=64 * MiB, compression=codec) as tier:
        out = np.empty(nbytes, np.uint8)
        assert tier.read_into(key_of(0), memoryview(out))
        assert np.array_equal(out, compressible)
        assert reads_back(tier, 1, nbytes)
        assert tier.stats().num_corrupt == 0


# -- corruption ------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


RECORD = HEADER_BYTES + 10_000


def test_a_flipped_payload_byte_is_quarantined(tier: DiskTier, root: Path) -> None:
    put(tier, range(6), 10_000)
    _flip(segment(root, 1), 3 * RECORD + HEADER_BYTES + 1234)
    assert read(tier, 3, 10_000) is None
    assert tier.stats().num_corrupt == 1
    assert not tier.contains(key_of(3))
    assert read(tier, 3, 10_000) is None
    assert tier.stats().num_corrupt == 1
    assert all(reads_back(tier, i, 10_000) for i in (0, 1, 2, 4, 5))


def test_a_corrupted_header_is_quarantined(tier: DiskTier, root: Path) -> None:
    put(tier, range(4), 10_000)
    _flip(segment(root, 1), 2 * RECORD + 20)  # inside the key field
    assert read(tier, 2, 10_000) is None
    assert tier.stats().num_corrupt == 1
    assert len(tier) == 3
    assert all(reads_back(tier, i, 10_000) for i in (0, 1, 3))


def test_a_truncated_segment_loses_only_the_blocks_past_the_cut(root: Path) -> None:
    with DiskTier(root, capacity_bytes=64 * MiB) as tier:
        put(tier, range(8), 10_000)
    os.truncate(segment(root, 1), 5 * RECORD + 100)
    with DiskTier(root, capacity_bytes=64 * MiB) as tier:
        survived = [reads_back(tier, i, 10_000) for i in range(8)]
        assert survived == [True] * 5 + [False] * 3
        assert tier.stats().num_corrupt == 3
        assert len(tier) == 5
    with DiskTier(root, capacity_bytes=64 * MiB) as tier:  # quarantine was committed
        assert len(tier) == 5


def test_a_missing_segment_file_is_quarantined(root: Path) -> None:
    with DiskTier(root, capacity_bytes=64 * MiB, segment_bytes=MiB) as tier:
        put(tier, range(150), 10_000)  # about 100 records per 1 MiB segment
    segment(root, 1).unlink()
    with DiskTier(root, capacity_bytes=64 * MiB, segment_bytes=MiB) as tier:
        assert read(tier, 0, 10_000) is None
        assert tier.stats().num_corrupt == 1
        assert reads_back(tier, 149, 10_000)


def test_check_reports_and_fixes_a_bad_block_and_an_orphan(
    tier: DiskTier, root: Path
) -> None:
    put(tier, range(5), 10_000)
    _flip(segment(root, 1), 4 * RECORD + HEADER_BYTES + 7)
    shutil.copy(segment(root, 1), segment(root, 99))

    report = tier.check()
    assert report.num_checked == 5
    assert [key for key, _ in report.bad_blocks] == [key_of(4).hex()]
    assert "checksum" in report.bad_blocks[0][1]
    assert report.orphan_segments == ("000000000099.seg",)
    assert not report.ok
    assert segment(root, 99).exists()
    assert len(tier) == 5  # fix=False changes nothing

    fixed = tier.check(fix=True)
    assert (fixed.num_rows_removed, fixed.num_segments_removed) == (1, 1)
    assert not segment(root, 99).exists()
    assert tier.stats().num_corrupt == 1
    again = tier.check()
    assert again.ok
    assert again.num_checked == 4
    assert all(reads_back(tier, i, 10_000) for i in range(4))


# -- capacity, reclaim, compaction -----------------------------------------------------

BLOCK = 128 * 1024
PER_SEGMENT = MiB // (HEADER_BYTES + BLOCK)  # 7 records fit a 1 MiB segment


def _fill(tier: DiskTier, start: int) -> int:
    """Writes blocks one at a time until one is refused; returns the next id."""
    i = start
    while put(tier, [i], BLOCK) == [True]:
        i += 1
    return i


def test_capacity_is_enforced_and_deletes_reclaim_space(root: Path) -> None:
    with DiskTier(root, capacity_bytes=8 * MiB) as tier:  # 1 MiB segments
        end = _fill(tier, 0)
        assert end == 8 * MiB // (HEADER_BYTES + BLOCK)
        assert tier.used_bytes <= 8 * MiB
        assert tier.stats().num_write_failures == 1
        assert not tier.stats().full  # over budget is not a full filesystem
        assert all(reads_back(tier, i, BLOCK) for i in range(end))

        used = tier.used_bytes
        assert tier.delete([key_of(i) for i in range(PER_SEGMENT)]) == PER_SEGMENT
        assert not segment(root, 1).exists()
        assert tier.used_bytes == used - PER_SEGMENT * (HEADER_BYTES + BLOCK)
        assert put(tier, [1000], BLOCK) == [True]
        assert all(reads_back(tier, i, BLOCK) for i in [*range(PER_SEGMENT, end), 1000])


def test_compaction_moves_live_blocks_of_half_empty_segments(root: Path) -> None:
    with DiskTier(root, capacity_bytes=8 * MiB) as tier:
        end = _fill(tier, 0)
        # Segments 1..4 keep 3 of their 7 blocks: live ratio 3/7 < 0.5.
        dead = [i for i in range(4 * PER_SEGMENT) if i % PER_SEGMENT < 4]
        assert tier.delete([key_of(i) for i in dead]) == len(dead)
        assert segment(root, 1).exists()
        assert tier.stats().num_compactions == 0

        new_end = _fill(tier, 1000)
        stats = tier.stats()
        assert stats.num_compactions >= 4
        assert not any(segment(root, s).exists() for s in range(1, 5))
        assert new_end - 1000 >= len(dead) - 1  # the freed space was reused
        assert tier.used_bytes <= 8 * MiB
        survivors = [i for i in range(end) if i not in dead]
        assert all(
            reads_back(tier, i, BLOCK) for i in [*survivors, *range(1000, new_end)]
        )
        order = [index_of(key) for key, _ in tier.entries()]
        assert order == [*survivors, *range(1000, new_end)]  # moves keep the order
    with DiskTier(root, capacity_bytes=8 * MiB) as tier:
        assert all(reads_back(tier, i, BLOCK) for i in survivors)
        assert tier.check().ok


# -- a really full filesystem ----------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount tmpfs")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_enospc_turns_the_tier_full_and_harms_nothing(small_fs: Path) -> None:
    nbytes = 64 * 1024
    with DiskTier(
        small_fs / "disk", capacity_bytes=64 * MiB, segment_bytes=256 * 1024
    ) as tier:
        end = _fill_nbytes(tier, nbytes)
        assert 30 < end < 64
        stats = tier.stats()
        assert stats.full
        assert all(reads_back(tier, i, nbytes) for i in range(end))
        assert tier.used_bytes == end * (HEADER_BYTES + nbytes)

        sizes = [path.stat().st_size for path in (small_fs / "disk").rglob("*.seg")]
        assert put(tier, [end], nbytes) == [False]  # refused without touching the disk
        assert tier.stats().num_write_failures == stats.num_write_failures + 1
        assert [p.stat().st_size for p in (small_fs / "disk").rglob("*.seg")] == sizes

        assert tier.delete([key_of(i) for i in range(12)]) == 12  # four whole segments
        assert not tier.stats().full
        assert put(tier, [end], nbytes) == [True]
        assert all(reads_back(tier, i, nbytes) for i in range(12, end + 1))
    with DiskTier(small_fs / "disk", capacity_bytes=64 * MiB) as tier:
        assert all(reads_back(tier, i, nbytes) for i in range(12, end + 1))
        assert tier.check().ok


def _fill_nbytes(tier: DiskTier, nbytes: int) -> int:
    i = 0
    while put(tier, [i], nbytes) == [True]:
        i += 1
    return i


def test_an_io_error_mid_write_cuts_the_segment_back(
    tier: DiskTier, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tier, range(3), 10_000)
    size = segment(root, 1).stat().st_size
    real_pwritev = os.pwritev
    calls = []

    def torn_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 1:  # half of the first record lands, then the device fails
            return real_pwritev(fd, [buffers[0], buffers[1][:5000]], offset)
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(os, "pwritev", torn_pwritev)
    assert put(tier, range(3, 6), 10_000) == [False] * 3
    monkeypatch.undo()
    assert calls == [size, size + HEADER_BYTES + 5000]
    assert segment(root, 1).stat().st_size == size  # the torn record is cut off
    assert not tier.stats().full  # EIO is not a full disk
    assert tier.stats().num_write_failures == 3
    assert put(tier, range(3, 6), 10_000) == [True] * 3  # into a fresh segment
    assert segment(root, 2).exists()
    assert all(reads_back(tier, i, 10_000) for i in range(6))
    assert tier.check().ok


def test_a_failed_index_commit_undoes_the_batch(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tier, range(2), 10_000)
    used = tier.used_bytes

    def failing(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(tier, "_transaction", failing)
    assert put(tier, range(2, 5), 10_000) == [False] * 3
    monkeypatch.undo()
    assert tier.used_bytes == used
    assert not tier.contains(key_of(2))
    assert put(tier, range(2, 5), 10_000) == [True] * 3
    assert all(reads_back(tier, i, 10_000) for i in range(5))


def test_fsync_mode_round_trip(root: Path) -> None:
    with DiskTier(root, capacity_bytes=16 * MiB, fsync=True) as tier:  # 1 MiB segments
        for start in range(0, 40, 8):
            assert put(tier, range(start, start + 8), 100_000) == [True] * 8
        assert tier.delete([key_of(i) for i in range(10)]) == 10
    with DiskTier(root, capacity_bytes=16 * MiB, fsync=True) as tier:
        assert len(tier) == 30
        assert all(reads_back(tier, i, 100_000) for i in range(10, 40))
        assert not segment(root, 1).exists()


def test_non_contiguous_arrays_are_stored(tier: DiskTier) -> None:
    base = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    strided = base[:, ::2]
    assert tier.write([(key_of(0), strided, BlockMeta(strided.nbytes))]) == [True]
    out = np.empty((64, 32), np.uint16)
    assert tier.read_into(key_of(0), memoryview(out))
    assert np.array_equal(out, strided)


# -- crashes ---------------------------------------------------------------------------

CRASH_BLOCK = 32 * 1024
CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from kvtier.core.index import BlockMeta
    from kvtier.tiers.disk import DiskTier

    root, start, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tier = DiskTier(root, capacity_bytes=1 << 30, segment_bytes=1 << 20)
    i = start
    while True:
        ids = range(i, i + 4)
        items = [
            (j.to_bytes(16, "little"),
             np.random.default_rng(j).integers(0, 256, nbytes, dtype=np.uint8),
             BlockMeta(nbytes))
            for j in ids
        ]
        assert tier.write(items) == [True] * 4
        print(*ids, sep="\\n", flush=True)
        i += 4
    """
)


def test_sigkill_loses_nothing_committed_and_serves_nothing_torn(
    tmp_path: Path,
) -> None:
    root = tmp_path / "disk"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = np.random.default_rng(0)
    committed: set[int] = set()
    start = 0
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), str(start), str(CRASH_BLOCK)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        for _ in range(int(rng.integers(1, 120))):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            committed.add(int(line))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        with DiskTier(root, capacity_bytes=1 << 30, segment_bytes=1 << 20) as tier:
            stored = [index_of(key) for key, _ in tier.entries()]
            assert committed <= set(stored)
            assert all(reads_back(tier, i, CRASH_BLOCK) for i in stored)
            assert tier.stats().num_corrupt == 0
            assert tier.check().ok
        start = max(stored) + 1


# -- expiry ----------------------------------------------------------------------------


def test_expired_blocks_are_never_returned(tier: DiskTier) -> None:
    now = time.time()
    put(tier, [0], 1000, expire_at=now + 100)
    put(tier, [1], 1000, expire_at=now - 1)
    put(tier, [2], 1000)
    assert read(tier, 0, 1000, now=now) is not None
    assert read(tier, 0, 1000, now=now + 100) is None
    assert not tier.contains(key_of(0), now=now + 100)
    assert tier.meta(key_of(0), now=now + 101) is None
    assert read(tier, 1, 1000) is None
    assert not tier.contains(key_of(1))
    assert [index_of(k) for k, _ in tier.entries()] == [0, 1, 2]  # to delete 1
    assert put(tier, [1], 1000) == [True]  # an expired key can be written again
    assert reads_back(tier, 1, 1000)
    assert tier.stats().num_corrupt == 0


# -- concurrency -----------------------------------------------------------------------


def test_concurrent_readers_and_a_writer(root: Path) -> None:
    nbytes = 48 * 1024
    errors: list[BaseException] = []
    written: list[int] = []
    done = threading.Event()
    num_good = [0]

    with DiskTier(root, capacity_bytes=16 * MiB, max_open_files=4) as tier:

        def writer() -> None:
            try:
                for start in range(0, 1200, 6):
                    assert put(tier, range(start, start + 6), nbytes) == [True] * 6
                    written.extend(range(start, start + 6))
                    # Blocks 60 writes old lose 2 of 3 (holes for compaction), the
                    # rest goes 300 writes later: about 140 blocks stay live.
                    older = range(max(0, start - 60), max(0, start - 54))
                    tier.delete([key_of(i) for i in older if i % 3])
                    oldest = range(max(0, start - 300), max(0, start - 294))
                    tier.delete([key_of(i) for i in oldest])
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            out = np.empty(nbytes, np.uint8)
            try:
                while not done.is_set() or rng.random() < 0.9:
                    if not written:
                        continue
                    i = written[int(rng.integers(len(written)))]
                    if tier.read_into(key_of(i), memoryview(out)):
                        assert np.array_equal(out, block_of(i, nbytes))
                        num_good[0] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer)]
        threads += [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        stats = tier.stats()
        assert stats.num_corrupt == 0
        assert stats.num_compactions > 0
        assert num_good[0] > 100
        assert tier.check().ok


# -- a big index -----------------------------------------------------------------------


def test_reopen_with_100k_blocks(root: Path) -> None:
    def payload(i: int) -> bytes:
        return i.to_bytes(8, "little") * 8

    with DiskTier(root, capacity_bytes=1 << 30) as tier:
        for start in range(0, 100_000, 5000):
            ids = range(start, start + 5000)
            items = [(key_of(i), payload(i), BlockMeta(64)) for i in ids]
            assert all(tier.write(items))
    with DiskTier(root, capacity_bytes=1 << 30) as tier:
        assert len(tier) == 100_000
        out = bytearray(64)
        assert tier.read_into(key_of(77_777), memoryview(out))
        assert bytes(out) == payload(77_777)


def test_drop_page_cache_keeps_blocks_readable(tier: DiskTier) -> None:
    put(tier, range(10), 100_000)
    tier.drop_page_cache()
    assert all(reads_back(tier, i, 100_000) for i in range(10))
