"""A real 3-member etcd cluster and kvtier nodes that join it."""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kvetcd import EtcdCluster, etcd_cluster
from kvnode import NodeProcess, start_node


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def cluster_name() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cluster_node(
    etcd: EtcdCluster, cluster_name: str, tmp_path: Path
) -> Iterator[Callable[..., NodeProcess]]:
    """Starts nodes of one cluster: ``cluster_node()``; ``cluster_node(data_dir=...)``
    restarts a node on an old data directory."""
    started: list[NodeProcess] = []

    def start(
        *settings: str, data_dir: Path | None = None, **kwargs: Any
    ) -> NodeProcess:
        if data_dir is None:
            data_dir = tmp_path / f"node{len(started)}"
            data_dir.mkdir()
        node = start_node(
            data_dir,
            f"cluster.name={cluster_name}",
            f"cluster.etcd={','.join(etcd.endpoints)}",
            "cluster.lease_ttl=2",
            f"server.node_id=n-{data_dir.name}",
            *settings,
            **kwargs,
        )
        started.append(node)
        return node

    yield start
    for node in started:
        with contextlib.suppress(Exception):
            node.stop(signal.SIGKILL)
