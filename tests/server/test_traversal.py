"""Nothing a client names becomes a path: keys, names, groups and namespaces cannot
make a node write outside its data directory, and a planted link in a shared tier
directory is never followed out of it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from kvtier import Namespace, TieredStore, block_keys
from kvtier.config import Config
from kvtier.core.keys import KeyChain
from kvtier.server._grpc import kvcache_pb2 as pb
from kvtier.server._grpc import kvcache_pb2_grpc as pb_grpc
from kvtier.tiers.shared_fs import SharedFSTier

HOSTILE = [
    "../../../../tmp/kvtier-escaped",
    "/tmp/kvtier-escaped-abs",
    "..",
    "a/../../b",
    "nul\0byte",
    "~root/.ssh/authorized_keys",
    "%2e%2e%2fescaped",
    "\\..\\..\\windows",
    "x" * 4096,
]


def files_under(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, files in os.walk(root) for f in files}


def test_hostile_names_groups_and_namespaces_stay_inside_the_data_dir(
    node_factory: Any, tmp_path: Path
) -> None:
    node = node_factory("store.write_policy=write_through")
    outside_before = files_under(tmp_path) - files_under(node.data_dir)
    with node.client(shared_memory=False) as client:
        for i, name in enumerate(HOSTILE):
            ns = Namespace(name, tenant=name, cache_salt=name, lora_id=name)
            chain = block_keys(ns, list(range(256)))
            hostile = KeyChain(list(chain), None, group=name)
            assert client.put(hostile, [np.full(64, i, np.uint8)])
    with grpc.insecure_channel(node.grpc) as channel:
        stub = pb_grpc.KVCacheServiceStub(channel)
        blocks = [pb.Block(name=name, data=b"n") for name in HOSTILE]
        assert all(stub.StoreKVCache(pb.StoreKVCacheRequest(blocks=blocks)).stored)
        got = stub.RetrieveKVCache(pb.RetrieveKVCacheRequest(names=HOSTILE))
        assert len(got.blocks) == len(HOSTILE)
    outside_after = files_under(tmp_path) - files_under(node.data_dir)
    new_outside = {p for p in outside_after - outside_before if p.suffix != ".log"}
    assert new_outside == set()
    assert not Path("/tmp/kvtier-escaped").exists()
    assert not Path("/tmp/kvtier-escaped-abs").exists()
    names = {p.name for p in files_under(node.data_dir)}
    assert not any(name in n for name in HOSTILE[:2] for n in names)


def test_links_and_fifos_planted_in_a_shared_directory_are_set_aside(
    tmp_path: Path,
) -> None:
    """Another "node" on the share plants a link out of it and a FIFO: reads miss at
    once (a FIFO would block an open forever), nothing outside is read or touched."""
    shared = tmp_path / "shared"
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not serve or move me" * 100)
    ns = Namespace(uuid.uuid4().hex, block_tokens=1)
    link_key, fifo_key = block_keys(ns, [1, 2])
    with SharedFSTier(shared) as tier:
        link = Path(tier._dir.block_path(link_key))
        fifo = Path(tier._dir.block_path(fifo_key))
    for path in (link, fifo):
        path.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    os.mkfifo(fifo)
    config = Config().replace(
        {
            "store.data_dir": str(tmp_path / "data"),
            "disk.enabled": False,
            "memory.capacity_bytes": "8MiB",
            "remote.urls": [f"file://{shared}"],
        }
    )
    with TieredStore(config) as store:
        assert store.get([link_key]) == [] and store.get([fifo_key]) == []
        assert store.stats().tiers["shared_fs"].healthy
    assert not link.is_symlink() and not fifo.exists()  # both moved aside
    assert secret.read_bytes() == b"do not serve or move me" * 100
    quarantined = list((shared / "quarantine").iterdir())
    assert len(quarantined) == 2
    with SharedFSTier(shared) as tier:
        assert tier.check().ok


def test_an_audit_never_follows_a_planted_directory_link(tmp_path: Path) -> None:
    """A link in place of blocks/ab/ must not lead check(fix=True) (or a sweep) to
    move or delete the files it points at."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [outside / ("ab" * 16 + ".kvb"), outside / "passwd"]
    for victim in victims:
        victim.write_bytes(b"precious")
    shared = tmp_path / "shared"
    with SharedFSTier(shared) as tier:
        (shared / "blocks" / "ab").symlink_to(outside, target_is_directory=True)
        (shared / "blocks" / "cd").mkdir()
        (shared / "blocks" / "cd" / "ef").symlink_to(outside, target_is_directory=True)
        report = tier.check(fix=True)
        assert len(report.bad) == 2  # the two links themselves
        tier.sweep()
    assert all(victim.read_bytes() == b"precious" for victim in victims)
    assert not (shared / "blocks" / "ab").exists()
    assert len(list((shared / "quarantine").iterdir())) == 2
