"""Cluster mode with real etcd and real nodes: placement, replication, failover."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from kvetcd import EtcdCluster
from kvnode import NodeProcess, wait_until

from kvtier import ClusterClient, Namespace, block_keys


def chain(count: int) -> Any:
    return block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(count)))


def block(i: int, nbytes: int = 8192) -> np.ndarray[Any, Any]:
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)


def client(etcd: EtcdCluster, name: str) -> ClusterClient:
    return ClusterClient(etcd.endpoints, name, timeout=2.0)


def held_blocks(node: NodeProcess) -> int:
    with node.client(shared_memory=False) as c:
        return int(c.stats()["stats"]["tiers"]["memory"]["num_blocks"])


def test_puts_and_gets_spread_over_the_nodes(
    etcd: EtcdCluster, cluster_name: str, cluster_node: Callable[..., NodeProcess]
) -> None:
    nodes = [cluster_node() for _ in range(3)]
    with client(etcd, cluster_name) as c:
        assert len(c.nodes) == 3
        keys = chain(60)
        data = [block(i) for i in range(60)]
        assert c.put(keys, data)
        got = c.get(keys)
        assert len(got) == 60
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))
        assert c.match(keys).num_blocks == 60
        assert c.contains([keys[5], chain(1)[0]]) == [True, False]
        held = [held_blocks(n) for n in nodes]
        assert sum(held) == 2 * 60  # R = 2
        assert min(held) > 10  # spread, not piled on one node

        # Sliding-window match across nodes: a hole at block 20 ends the prefix
        # match, not a window match whose window fits after it.
        assert c.delete([keys[20]]) == 1
        assert c.match(keys).num_blocks == 20
        windowed = c.match(keys, window=5)
        assert windowed.num_blocks == 60
        assert len(windowed.tiers) == 5
        assert set(windowed.tiers) <= set(c.nodes)
        assert c.match(keys, window=45).num_blocks == 20  # only 39 stored after it


def test_a_killed_node_costs_no_request_and_rejoins(
    etcd: EtcdCluster, cluster_name: str, cluster_node: Callable[..., NodeProcess]
) -> None:
    nodes = [cluster_node() for _ in range(3)]
    stored: dict[int, bytes] = {}
    failures: list[str] = []
    stop = threading.Event()
    keys = chain(400)

    def load() -> None:
        with client(etcd, cluster_name) as c:
            i = 0
            while not stop.is_set() and i < len(keys):
                if not c.put(keys[i : i + 1], [block(i)]):
                    failures.append(f"put {i} refused")
                stored[i] = keys[i]
                probe = (i * 7) % (i + 1)
                got = c.get([keys[probe]])
                if len(got) != 1 or not np.array_equal(got[0], block(probe)):
                    failures.append(f"get {probe} wrong or missing")
                i += 1

    worker = threading.Thread(target=load)
    worker.start()
    wait_until(lambda: len(stored) >= 60, 60, "the load to run")
    victim = nodes[1]
    victim.stop(signal.SIGKILL)
    wait_until(lambda: len(stored) >= 200 or not worker.is_alive(), 120, "more load")
    stop.set()
    worker.join(timeout=120)
    assert failures == []
    with client(etcd, cluster_name) as c:
        wait_until(lambda: len(c.nodes) == 2, 10, "the dead node to leave")
        got = c.get([keys[i] for i in sorted(stored)])
        assert len(got) == len(stored)
        restarted = cluster_node(data_dir=victim.data_dir)
        wait_until(lambda: len(c.nodes) == 3, 10, "the restarted node to rejoin")
        assert f"n-{victim.data_dir.name}" in c.nodes
        cluster_node()  # a fourth node joins: placement adjusts, reads still work
        wait_until(lambda: len(c.nodes) == 4, 10, "the new node")
        got = c.get([keys[i] for i in sorted(stored)])
        assert len(got) == len(stored)
        assert all(
            np.array_equal(g, block(i))
            for g, i in zip(got, sorted(stored), strict=True)
        )
        assert restarted.proc.poll() is None


def test_the_cluster_survives_losing_the_etcd_leader(
    etcd: EtcdCluster, cluster_name: str, cluster_node: Callable[..., NodeProcess]
) -> None:
    cluster_node()
    cluster_node()
    with client(etcd, cluster_name) as c:
        keys = chain(20)
        assert c.put(keys, [block(i) for i in range(20)])
        leader = etcd.leader()
        assert leader is not None
        etcd.kill(leader)
        started = time.monotonic()
        assert len(c.get(keys)) == 20  # the data path does not need etcd
        assert c.put(chain(5), [block(i) for i in range(5)])
        cluster_node()  # a membership change after the re-election is still seen
        wait_until(lambda: len(c.nodes) == 3, 15, "the new member after re-election")
        assert time.monotonic() - started < 15
        etcd.start(leader, state="existing")
        etcd.wait_ready()


def test_cluster_status_over_http(
    etcd: EtcdCluster, cluster_name: str, cluster_node: Callable[..., NodeProcess]
) -> None:
    import json
    import urllib.request

    node = cluster_node()
    cluster_node()
    with urllib.request.urlopen(node.http + "/v1/cluster", timeout=10) as response:
        view = json.loads(response.read())
    assert view["cluster"] == cluster_name
    assert len(view["nodes"]) >= 1 and view["settings"]["replicas"] == 2
