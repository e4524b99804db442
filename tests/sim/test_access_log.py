"""The node access log: round trip, and a log recorded by a real store replays to the
same hits the store reported."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from kvtier import KVLayout, Namespace, TieredStore, engine_keys
from kvtier.config import Config
from kvtier.core.keys import BlockKey
from kvtier.errors import TraceFormatError
from kvtier.sim.access_log import AccessLogWriter
from kvtier.sim.readers import read_trace
from kvtier.sim.replay import ReplayConfig, replay

KiB = 1024
LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=4, head_dim=32, dtype="float16", block_tokens=16
)  # 16 KiB blocks
NS = Namespace("test-model", layout_id=LAYOUT.layout_id, block_tokens=16)


def test_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    keys = [BlockKey(b"\x01" * 16), BlockKey(b"\x02" * 16)]
    with AccessLogWriter(path, block_tokens=16, node="n1") as log:
        log.record(10.0, keys, 1)
        log.record(11.5, keys[:1], 0, num_tokens=9)
    with AccessLogWriter(path, block_tokens=16) as log:  # appends, no second header
        log.record(12.0, keys, 2)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "kvtier_access_log": 1,
        "block_tokens": 16,
        "node": "n1",
    }
    assert len(lines) == 4
    trace = read_trace(path)
    assert [r.recorded_hits for r in trace] == [1, 0, 2]
    assert trace.requests[0].keys == tuple(keys)
    assert trace.requests[1].num_tokens == 9 and trace.requests[0].num_tokens == 32


def test_bad_access_lines(tmp_path: Path) -> None:
    header = '{"kvtier_access_log": 1, "block_tokens": 16}'
    for bad, message in [
        ('{"ts": 1, "keys": ["0g"], "hits": 0}', "hex strings"),
        ('{"ts": 1, "keys": ["00"], "hits": 2}', "'hits' must be an integer in"),
        ('{"ts": 1, "keys": [], "hits": 0}', "non-empty list"),
        ('{"keys": ["00"], "hits": 0}', "'ts' must be a number"),
    ]:
        path = tmp_path / "bad.jsonl"
        path.write_text(header + "\n" + bad + "\n")
        with pytest.raises(TraceFormatError, match=message) as excinfo:
            read_trace(path)
        assert excinfo.value.line_number == 2


def record_workload(tmp_path: Path, policy: str) -> tuple[Path, list[int]]:
    """Serves random multi-turn prompts from a real memory-only store, logging them."""
    config = Config().replace(
        {
            "store.data_dir": str(tmp_path / "data"),
            "memory.capacity_bytes": 256 * KiB,
            "memory.slab_bytes": 64 * KiB,
            "memory.policy": policy,
            "disk.enabled": False,
        }
    )
    rng = random.Random(7)
    conversations = [[rng.randrange(10**6)] for _ in range(6)]
    block = np.zeros(LAYOUT.block_shape, np.float16)
    log_path, hits_seen = tmp_path / f"{policy}.jsonl", []
    with TieredStore(config) as store, AccessLogWriter(log_path, 16) as log:
        for step in range(120):
            turn = rng.choice(conversations)
            turn.extend(rng.randrange(10**6) for _ in range(rng.randint(1, 3)))
            chain = engine_keys(NS, turn)
            hits = store.match(chain).num_blocks
            assert len(store.get(chain[:hits], layout=LAYOUT)) == hits
            store.put(chain[hits:], [block] * (len(chain) - hits), layout=LAYOUT)
            log.record(float(step), chain, hits)
            hits_seen.append(hits)
    return log_path, hits_seen


@pytest.mark.parametrize("policy", ["lru", "leaf_lru", "s3fifo", "arc", "lfu"])
def test_a_recorded_log_replays_to_the_hits_the_store_reported(
    tmp_path: Path, policy: str
) -> None:
    log_path, hits_seen = record_workload(tmp_path, policy)
    assert 0 < sum(hits_seen) < sum(len(r.keys) for r in read_trace(log_path))
    # The store's own setting: 16 blocks of 16 KiB, watermarks 0.9 / 0.8.
    config = ReplayConfig(
        16, policy, block_bytes=16 * KiB, high_watermark=0.9, low_watermark=0.8
    )
    result = replay(read_trace(log_path), config)
    assert result.request_hits == hits_seen
