"""A real cluster behind a faulty network: a partitioned node, a node cut off etcd.

Each node advertises a proxy in front of it, so the cluster client reaches it through
the proxy; a node's etcd endpoint can be a proxy too.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvetcd import EtcdCluster, etcd_cluster
from kvnode import wait_until

from kvtier import ClusterClient, Namespace, block_keys
from kvtier.chaos.node import NodeProcess, NodeSpec
from kvtier.chaos.proxy import ChaosProxy


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd"), size=1) as cluster:
        yield cluster


def block(i: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(i).integers(0, 256, 8192, dtype=np.uint8)


def cluster_node(
    tmp_path: Path, name: str, cluster: str, etcd: str, index: int
) -> tuple[NodeProcess, ChaosProxy]:
    """A node whose clients come through a proxy, and that proxy."""
    spec = NodeSpec(tmp_path / f"{name}{index}", memory="64MiB")
    node = NodeProcess(spec)
    proxy = ChaosProxy(node.address).start()
    node.start(
        f"cluster.name={cluster}",
        f"cluster.etcd={etcd}",
        "cluster.lease_ttl=2",
        f"server.node_id={name}{index}",
        f"cluster.advertise={proxy.address}",
    )
    wait_until(lambda: ready(node), 10, "the node to join its cluster")
    return node, proxy


def ready(node: NodeProcess) -> bool:
    """Registered in etcd: a node answers before it has joined, ready after."""
    with node.client() as client:
        return bool(client.stats()["ready"])


def test_a_partitioned_node_costs_timeouts_never_wrong_bytes(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    name = f"c{uuid.uuid4().hex[:8]}"
    members = [
        cluster_node(tmp_path, "n", name, etcd.endpoints[0], i) for i in range(3)
    ]
    keys = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(40)))
    try:
        with ClusterClient(etcd.endpoints, name, timeout=1.0, retries=0) as client:
            wait_until(lambda: len(client.nodes) == 3, 10, "three nodes")
            assert client.put(keys[:20], [block(i) for i in range(20)])
            members[0][1].blackhole = True  # R = 2: every block has another replica
            got = client.get(keys[:20])
            assert len(got) == 20
            assert all(np.array_equal(g, block(i)) for i, g in enumerate(got))
            assert client.put(keys[20:], [block(i) for i in range(20, 40)])  # W = 1
            members[0][1].heal()
            got = client.get(keys)
            assert len(got) == 40
            assert all(np.array_equal(g, block(i)) for i, g in enumerate(got))
    finally:
        for node, proxy in members:
            node.kill()
            proxy.stop()


def test_a_node_cut_off_from_etcd_leaves_serves_and_rejoins(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    name = f"c{uuid.uuid4().hex[:8]}"
    with ChaosProxy(etcd.endpoints[0]) as etcd_proxy:
        node, proxy = cluster_node(tmp_path, "e", name, etcd_proxy.address, 0)
        keys = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(4)))
        try:
            with ClusterClient(etcd.endpoints, name, timeout=1.0) as client:
                assert client.nodes == ["e0"]
                assert client.put(keys, [block(i) for i in range(4)])
                etcd_proxy.blackhole = True  # its lease (2 s) runs out
                wait_until(lambda: client.nodes == [], 15, "the node to leave")
                with node.client() as direct:  # the data path needs no etcd
                    assert len(direct.get(keys)) == 4
                etcd_proxy.heal()
                wait_until(lambda: client.nodes == ["e0"], 15, "the node to rejoin")
                got = client.get(keys)
                assert len(got) == 4
                assert all(np.array_equal(g, block(i)) for i, g in enumerate(got))
        finally:
            node.kill()
            proxy.stop()
