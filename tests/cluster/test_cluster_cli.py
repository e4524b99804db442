"""`kvtier cluster status / set / quota` against a real cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable

import numpy as np
from kvetcd import EtcdCluster
from kvnode import NodeProcess, wait_until

from kvtier import ClusterClient, Namespace, block_keys


def kvtier(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # room for the table's columns
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_status_settings_and_quotas(
    etcd: EtcdCluster, cluster_name: str, cluster_node: Callable[..., NodeProcess]
) -> None:
    nodes = [cluster_node(), cluster_node()]
    where = ["--etcd", ",".join(etcd.endpoints), "--cluster", cluster_name]
    out = kvtier("cluster", "status", *where, "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert len(status["nodes"]) == 2 and all(n["healthy"] for n in status["nodes"])
    table = kvtier("cluster", "status", *where)
    assert table.returncode == 0 and nodes[0].address.split(":")[1] in table.stdout

    out = kvtier("cluster", "set", *where, "replicas=1")
    assert json.loads(out.stdout) == {"replicas": 1, "write_quorum": 1}
    bad = kvtier("cluster", "set", *where, "replicas=two")
    assert bad.returncode == 1 and "replicas=R" in bad.stderr

    assert (
        kvtier("cluster", "quota", *where, "acme", "--memory", "64KiB").returncode == 0
    )
    with ClusterClient(etcd.endpoints, cluster_name) as client:
        wait_until(
            lambda: client.aio.membership.settings.replicas == 1, 10, "the new settings"
        )
        keys = block_keys(
            Namespace(uuid.uuid4().hex, tenant="acme", block_tokens=1), list(range(40))
        )
        for i in range(40):  # 40 x 16 KiB for a 64 KiB per-node quota
            client.put(keys[i : i + 1], [np.ones(16384, np.uint8)])
        held = sum(
            (s or {})
            .get("stats", {})
            .get("group_bytes", {})
            .get("memory", {})
            .get("acme", 0)
            for s in client.stats().values()
        )
    assert 0 < held <= 2 * 64 * 1024
