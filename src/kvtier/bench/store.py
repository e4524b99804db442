"""``kvtier bench store``: the embedded store against same-run baselines.

Every figure is a ratio against a baseline measured in the same run on the same bytes
(higher is better), or a time. Each is the median of ``repeats`` runs:

* memory put / get of 2 MiB blocks vs ``numpy.copyto`` of the same bytes between
  preallocated, already-touched buffers;
* disk write vs a plain sequential ``os.write`` of the same bytes to one file, both
  without fsync, and both with one fsync per batch of ``batch_blocks``;
* disk cold read (page cache dropped with ``posix_fadvise(DONTNEED)``) vs a plain
  sequential read of that file into the same buffers;
* reopening a disk tier of ``reopen_blocks`` blocks until its first get returns;
* keys + prefix match of a 128k-token prompt.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.timing import median_time, paired
from kvtier.config import Config, DiskConfig, MemoryConfig, StoreConfig
from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey, Namespace, block_keys
from kvtier.store import TieredStore
from kvtier.tiers.disk import DiskTier

__all__ = ["StoreBenchConfig", "run_store_bench"]

MiB = 1 << 20


@dataclass(frozen=True)
class StoreBenchConfig:
    """Sizes of ``kvtier bench store`` (``--quick`` shrinks them)."""

    block_bytes: int = 2 * MiB
    memory_blocks: int = 64
    disk_blocks: int = 128
    batch_blocks: int = 16
    reopen_blocks: int = 100_000
    prompt_tokens: int = 131_072
    repeats: int = 7
    directory: str | None = None

    @classmethod
    def quick(cls, directory: str | None = None) -> StoreBenchConfig:
        return cls(disk_blocks=64, reopen_blocks=20_000, repeats=5, directory=directory)


Progress = Callable[[str], None]


def run_store_bench(cfg: StoreBenchConfig, progress: Progress) -> dict[str, float]:
    """Runs every measurement; returns the figures keyed as ``--json`` prints them."""
    results: dict[str, float] = {}
    with _scratch_dir(cfg.directory) as scratch:
        progress("memory tier put/get vs numpy.copyto")
        results.update(_bench_memory(cfg, scratch))
        progress("disk tier write vs sequential file write (no fsync)")
        results.update(_bench_disk(cfg, scratch, fsync=False))
        progress("disk tier write vs sequential file write (fsync per batch)")
        results.update(_bench_disk(cfg, scratch, fsync=True))
        progress(f"reopen a disk tier of {cfg.reopen_blocks:,} blocks")
        results.update(_bench_reopen(cfg, scratch))
        progress(f"keys + prefix match of a {cfg.prompt_tokens:,}-token prompt")
        results.update(_bench_keys(cfg, scratch))
    return results


@contextmanager
def _scratch_dir(directory: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir=directory))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _blocks(count: int, nbytes: int, seed: int) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(count)]


def _keys(count: int, salt: str) -> list[BlockKey]:
    ns = Namespace(f"bench-{salt}", block_tokens=1)
    return list(block_keys(ns, list(range(count))))


def _bench_memory(cfg: StoreBenchConfig, scratch: Path) -> dict[str, float]:
    n, size = cfg.memory_blocks, cfg.block_bytes
    sources = _blocks(n, size, seed=1)
    outs = [np.ones(size, dtype=np.uint8) for _ in range(n)]
    baseline_dst = np.ones(n * size, dtype=np.uint8)

    def copy_in() -> None:
        for i, src in enumerate(sources):
            np.copyto(baseline_dst[i * size : (i + 1) * size], src)

    def copy_out() -> None:
        for i, out in enumerate(outs):
            np.copyto(out, baseline_dst[i * size : (i + 1) * size])

    config = Config(
        store=StoreConfig(data_dir=str(scratch / "mem")),
        memory=MemoryConfig(capacity_bytes=2 * n * size),
        disk=DiskConfig(enabled=False),
    )
    keys = _keys(n, "memory")
    repeats = cfg.repeats * 4  # each run is short: take more of them
    with TieredStore(config) as store:
        store.put(keys, sources)  # touch the arena's pages once, like the baseline's
        copy_in_s, put_s = paired(
            copy_in,
            lambda: _put_all(store, keys, sources),
            repeats,
            subject_setup=lambda: _delete_all(store, keys),
        )
        copy_out_s, get_s = paired(
            copy_out, lambda: _get_all(store, keys, outs), repeats
        )
        if not all(np.array_equal(a, b) for a, b in zip(outs, sources, strict=True)):
            raise RuntimeError("benchmark memory get returned wrong bytes")
    return {
        "memcpy_bytes_per_s": n * size / copy_in_s,
        "memory_put_bytes_per_s": n * size / put_s,
        "memory_get_bytes_per_s": n * size / get_s,
        "memory_put_ratio": copy_in_s / put_s,
        "memory_get_ratio": copy_out_s / get_s,
    }


def _delete_all(store: TieredStore, keys: list[BlockKey]) -> None:
    store.delete(keys)


def _put_all(store: TieredStore, keys: list[BlockKey], blocks: list[Any]) -> None:
    if not store.put(keys, blocks):
        raise RuntimeError("benchmark put was refused: memory too small")


def _get_all(store: TieredStore, keys: list[BlockKey], outs: list[Any]) -> None:
    if store.get_into(keys, outs) != len(keys):
        raise RuntimeError("benchmark get missed")


def _bench_disk(
    cfg: StoreBenchConfig, scratch: Path, *, fsync: bool
) -> dict[str, float]:
    n, size, batch = cfg.disk_blocks, cfg.block_bytes, cfg.batch_blocks
    sources = _blocks(n, size, seed=2)
    keys = _keys(n, "disk")
    batches = [
        [(keys[i], sources[i], BlockMeta(size)) for i in range(start, start + batch)]
        for start in range(0, n, batch)
    ]
    suffix = "fsync" if fsync else "nofsync"
    plain = scratch / f"plain-{suffix}.bin"
    tier_dir = scratch / f"disk-{suffix}"
    # The tier as configured by default (256 MiB segments), opened outside the clock.
    capacity = DiskConfig().capacity_bytes
    tiers: list[DiskTier] = []

    def open_tier() -> None:
        _close_all(tiers)
        shutil.rmtree(tier_dir, ignore_errors=True)
        tiers.append(DiskTier(tier_dir, capacity_bytes=capacity, fsync=fsync))

    def plain_write() -> None:
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for start in range(0, n, batch):
                for src in sources[start : start + batch]:
                    os.write(fd, src.data)
                if fsync:
                    os.fsync(fd)
        finally:
            os.close(fd)

    def tier_write() -> None:
        for items in batches:
            if not all(tiers[-1].write(items)):
                raise RuntimeError("benchmark disk write was refused")

    plain_s, tier_s = paired(
        plain_write,
        tier_write,
        cfg.repeats,
        lambda: plain.unlink(missing_ok=True),
        open_tier,
    )
    figures = {
        f"disk_write_{suffix}_ratio": plain_s / tier_s,
        f"disk_write_{suffix}_bytes_per_s": n * size / tier_s,
        f"plain_write_{suffix}_bytes_per_s": n * size / plain_s,
    }
    if not fsync:
        figures.update(_bench_cold_read(cfg, plain, tiers[-1], keys, sources))
    _close_all(tiers)
    return figures


def _bench_cold_read(
    cfg: StoreBenchConfig,
    plain: Path,
    tier: DiskTier,
    keys: list[BlockKey],
    sources: list[np.ndarray[Any, Any]],
) -> dict[str, float]:
    size = cfg.block_bytes
    outs = [np.ones(size, dtype=np.uint8) for _ in keys]

    def plain_read() -> None:
        fd = os.open(plain, os.O_RDONLY)
        try:
            for i, out in enumerate(outs):
                os.preadv(fd, [out.data], i * size)
        finally:
            os.close(fd)

    def tier_read() -> None:
        for key, out in zip(keys, outs, strict=True):
            if not tier.read_into(key, out.data):
                raise RuntimeError("benchmark disk read missed")

    plain_s, tier_s = paired(
        plain_read,
        tier_read,
        cfg.repeats,
        lambda: _drop_file_cache(plain),
        tier.drop_page_cache,
    )
    if not all(np.array_equal(a, b) for a, b in zip(outs, sources, strict=True)):
        raise RuntimeError("benchmark disk read returned wrong bytes")
    total = len(keys) * size
    return {
        "disk_cold_read_ratio": plain_s / tier_s,
        "disk_cold_read_bytes_per_s": total / tier_s,
        "plain_cold_read_bytes_per_s": total / plain_s,
    }


def _close_all(tiers: list[DiskTier]) -> None:
    while tiers:
        tiers.pop().close()


def _drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _bench_reopen(cfg: StoreBenchConfig, scratch: Path) -> dict[str, float]:
    n, size = cfg.reopen_blocks, 1024
    data_dir = scratch / "reopen"
    keys = _keys(n, "reopen")
    payload = np.arange(size, dtype=np.uint8)
    with DiskTier(data_dir / "disk", capacity_bytes=4 * n * (size + 64)) as tier:
        for start in range(0, n, 1000):
            chunk = keys[start : start + 1000]
            tier.write([(k, payload, BlockMeta(size)) for k in chunk])
    config = Config(
        store=StoreConfig(data_dir=str(data_dir)),
        memory=MemoryConfig(capacity_bytes=64 * MiB),
        disk=DiskConfig(capacity_bytes=4 * n * (size + 64)),
    )
    opened_at = time.perf_counter()
    with TieredStore(config) as store:
        blocks = store.get(keys[-1:])
        elapsed = time.perf_counter() - opened_at
        if len(blocks) != 1 or not np.array_equal(blocks[0], payload):
            raise RuntimeError("reopened store did not serve its block")
    return {"reopen_blocks": float(n), "reopen_first_get_s": elapsed}


def _keys_of(ns: Namespace, tokens: Any) -> None:
    block_keys(ns, tokens)


def _bench_keys(cfg: StoreBenchConfig, scratch: Path) -> dict[str, float]:
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 150_000, cfg.prompt_tokens, dtype=np.int64)
    token_list = tokens.tolist()
    ns = Namespace("bench-model", block_tokens=256)
    keys = block_keys(ns, tokens)
    config = Config(
        store=StoreConfig(data_dir=str(scratch / "keys")),
        memory=MemoryConfig(capacity_bytes=64 * MiB),
        disk=DiskConfig(enabled=False),
    )
    runs = max(20, cfg.repeats * 10)
    with TieredStore(config) as store:
        store.put(keys, [np.zeros(64, dtype=np.uint8)] * len(keys))

        def keys_and_match() -> None:
            if store.match(block_keys(ns, tokens)).num_blocks != len(keys):
                raise RuntimeError("benchmark match missed")

        match_s = median_time(keys_and_match, runs)
    keys_s = median_time(lambda: _keys_of(ns, tokens), runs)
    list_s = median_time(lambda: _keys_of(ns, token_list), runs)
    return {
        "prompt_blocks": float(len(keys)),
        "keys_128k_ms": keys_s * 1e3,
        "keys_128k_from_list_ms": list_s * 1e3,
        "keys_match_128k_ms": match_s * 1e3,
        "keys_per_1k_blocks_ms": keys_s * 1e3 * 1000 / len(keys),
    }
