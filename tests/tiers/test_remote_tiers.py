"""Remote tiers against real servers: Redis (single, Cluster, Sentinel), S3 (moto),
a peer node; the health guard; and a store reading what another store wrote."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvservers import moto_server, redis_cluster, redis_sentinel, redis_server

from kvtier import TieredStore
from kvtier.config import Config
from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.tiers.remote import Guarded, open_remote


def key() -> BlockKey:
    return BlockKey(os.urandom(16))


def block(nbytes: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def round_trip(tier: Guarded, nbytes: int = 4096, count: int = 5) -> None:
    keys = [key() for _ in range(count)]
    blocks = [block(nbytes, i) for i in range(count)]
    assert tier.write(
        [(k, b, BlockMeta(nbytes)) for k, b in zip(keys, blocks, strict=True)]
    )
    for k, b in zip(keys, blocks, strict=True):
        got = tier.get(k)
        assert got is not None and np.array_equal(got, b)
    assert tier.contains([keys[0], key()]) == [True, False]
    assert tier.delete(keys[:2]) == 2
    assert tier.get(keys[0]) is None and tier.healthy


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as port:
        yield f"redis://127.0.0.1:{port}/0"


def test_redis_round_trip_expiry_and_corruption(redis_url: str) -> None:
    import redis

    tier = open_remote(redis_url, compression="lz4")
    round_trip(tier)
    soon = key()
    tier.write([(soon, block(64), BlockMeta(64, expire_at=time.time() + 60))])
    assert tier.get(soon, now=time.time() + 61) is None  # never returned once expired
    garbled = key()
    tier.write([(garbled, block(128), BlockMeta(128))])
    raw = redis.Redis.from_url(redis_url)
    name = b"kvtier:" + garbled.hex().encode()
    value = bytearray(raw.get(name) or b"")
    value[-1] ^= 0xFF
    raw.set(name, bytes(value))
    assert tier.get(garbled) is None  # fails its checksum: a miss, never wrong bytes
    raw.close()
    tier.close()


def test_redis_cluster_spreads_large_blocks_over_the_masters(tmp_path: Path) -> None:
    import redis

    with redis_cluster(tmp_path) as ports:
        tier = open_remote(f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}")
        round_trip(tier, nbytes=4 << 20, count=6)
        keys = [key() for _ in range(30)]
        tier.write([(k, block(1024), BlockMeta(1024)) for k in keys])
        sizes = [redis.Redis(port=p).dbsize() for p in ports]
        assert all(size > 0 for size in sizes) and sum(sizes) >= 30
        tier.close()


def test_redis_behind_sentinel(tmp_path: Path) -> None:
    with redis_sentinel(tmp_path) as (_, sentinel):
        tier = open_remote(f"redis+sentinel://127.0.0.1:{sentinel}/mymaster")
        round_trip(tier)
        tier.close()


def test_s3_round_trip_multipart_and_a_server_that_disappears() -> None:
    import boto3

    with moto_server() as (port, proc):
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="a",
            aws_secret_access_key="b",
        ).create_bucket(Bucket="kvtier-test")
        url = (
            f"s3://kvtier-test/cache?endpoint_url={endpoint}&access_key=a"
            "&secret_key=b&multipart_bytes=5MiB"
        )
        tier = open_remote(url, retry_after=0.2)
        round_trip(tier)
        big = key()
        data = block(12 << 20, 7)  # over the multipart threshold: uploaded in parts
        assert tier.write([(big, data, BlockMeta(data.nbytes))])
        got = tier.get(big)
        assert got is not None and np.array_equal(got, data)
        proc.kill()
        proc.wait()
        assert tier.get(big) is None  # a miss, not an error
        assert not tier.healthy and tier.errors >= 1
        assert tier.write([(key(), block(16), BlockMeta(16))]) == [False]
        tier.close()


def test_the_guard_skips_a_failing_tier_and_tries_again_later() -> None:
    from kvtier.errors import StorageError

    class Flaky:
        name = "flaky"
        failing = True
        calls = 0

        def get(self, key: BlockKey, now: float | None = None) -> Any:
            self.calls += 1
            if self.failing:
                raise StorageError("down")
            return np.zeros(4, np.uint8)

    clock = [0.0]
    flaky = Flaky()
    guard = Guarded(flaky, retry_after=1.0, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert guard.get(key()) is None and flaky.calls == 1
    assert guard.get(key()) is None and flaky.calls == 1  # skipped while down
    clock[0] = 1.0
    assert guard.get(key()) is None and flaky.calls == 2  # tried again, still down
    clock[0] = 2.5  # the backoff doubled: not yet
    assert guard.get(key()) is None and flaky.calls == 2
    clock[0] = 3.0
    flaky.failing = False
    assert guard.get(key()) is not None and guard.healthy


def test_a_store_reads_what_another_wrote_through_redis(
    redis_url: str, tmp_path: Path
) -> None:
    def store(name: str) -> TieredStore:
        return TieredStore(
            Config().replace(
                {
                    "store.data_dir": str(tmp_path / name),
                    "memory.capacity_bytes": "16MiB",
                    "remote.urls": redis_url,
                    "store.write_policy": "write_through",
                }
            )
        )

    keys = [key() for _ in range(3)]
    blocks = [block(8192, i) for i in range(3)]
    with store("a") as a:
        assert a.put(keys, blocks)
    with store("b") as b:
        match = b.match(keys)
        assert match.num_blocks == 3 and match.tiers == ("redis",) * 3
        got = b.get(keys)
        assert all(np.array_equal(x, y) for x, y in zip(got, blocks, strict=True))
        assert b.match(keys).tiers == ("memory",) * 3
        assert b.stats().tiers["redis"].hits == 3


def test_a_peer_node_as_a_tier(tmp_path: Path) -> None:
    from kvnode import start_node

    (tmp_path / "peer").mkdir()
    node = start_node(tmp_path / "peer")
    try:
        tier = open_remote(f"kvtier://{node.address}")
        round_trip(tier)
        tier.close()
    finally:
        node.stop()
