"""Cluster membership and metadata in etcd.

Layout under ``/kvtier/<cluster>/``:

* ``nodes/<node id>``: NodeInfo JSON, under the node's lease (each node, kept alive);
* ``config``: ``{"replicas": R, "write_quorum": W}`` (the first node, or
  ``kvtier cluster set``);
* ``quotas/<group>``: ``{"memory_bytes": ..., "disk_bytes": ...}``, per node
  (``kvtier cluster set``).

Only this goes to etcd. Per-block metadata stays on the nodes that own the blocks: etcd
keeps its whole data set in memory (a few GB at most), every write goes through Raft to
a quorum (thousands of writes per second for the whole cluster), while a busy cluster
stores and evicts tens of thousands of blocks per second. Placement is computed by
clients from membership (rendezvous hashing), so no per-block lookup is needed at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kvtier.cluster.etcd import Etcd, KeptLease
from kvtier.errors import ClusterError

__all__ = ["ClusterSettings", "Membership", "NodeInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeInfo:
    """What a node publishes about itself."""

    node_id: str
    address: str
    http: str = ""
    zone: str = ""
    capacity_bytes: int = 0
    version: str = ""
    started_at: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeInfo:
        fields = json.loads(data)
        return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ClusterSettings:
    """Cluster-wide settings kept in etcd."""

    replicas: int = 2
    write_quorum: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 1 or not 1 <= self.write_quorum <= self.replicas:
            raise ClusterError(
                "cluster settings need replicas >= 1 and 1 <= write_quorum <= "
                f"replicas, got replicas={self.replicas} "
                f"write_quorum={self.write_quorum}"
            )


class Membership:
    """One node's registration, and anyone's live view of the cluster.

    ``nodes`` always reflects etcd as of the last event applied; listeners are called
    after each change with the new view.
    """

    def __init__(self, etcd: Etcd, cluster: str) -> None:
        if not cluster or "/" in cluster:
            raise ClusterError(f"a cluster name is a non-empty word, got {cluster!r}")
        self.etcd = etcd
        self.cluster = cluster
        self.root = f"/kvtier/{cluster}/".encode()
        self.nodes: dict[str, NodeInfo] = {}
        self.quotas: dict[str, dict[str, int | None]] = {}
        self.settings = ClusterSettings()
        self.listeners: list[Callable[[Membership], None]] = []
        self._lease: KeptLease | None = None
        self._info: NodeInfo | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.revision = 0

    # ------------------------------------------------------------- a node

    async def register(self, info: NodeInfo, ttl: int) -> None:
        """Publishes ``info`` under a lease kept alive until :meth:`deregister`."""
        self._info = info
        self._lease = KeptLease(self.etcd, ttl, self._put_info)
        await self._put_info(await self._lease.start())

    async def _put_info(self, lease: Any) -> None:
        assert self._info is not None
        await self.etcd.put(
            self._node_key(self._info.node_id), self._info.to_json(), lease
        )

    async def deregister(self) -> None:
        """Leaves the cluster at once (clients stop routing to this node)."""
        if self._lease is not None:
            await self._lease.stop()
            self._lease = None

    def _node_key(self, node_id: str) -> bytes:
        return self.root + b"nodes/" + node_id.encode()

    # ------------------------------------------------------------- everyone

    async def load(self) -> None:
        """Reads the whole cluster state once."""
        items, self.revision = await self.etcd.get_prefix(self.root)
        self.nodes, self.quotas = {}, {}
        for key, value in items:
            self._apply(key, value)
        self._notify()

    async def start_watching(self) -> None:
        """Loads the state, then follows every change in the background."""
        await self.load()
        self._watch_task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for event in self.etcd.watch(self.root, self.revision + 1):
            if event.resync:
                await self.load()
                continue
            self.revision = event.revision
            self._apply(event.key, event.value)
            self._notify()

    def _apply(self, key: bytes, value: bytes | None) -> None:
        name = key[len(self.root) :].decode()
        kind, _, item = name.partition("/")
        try:
            if kind == "nodes":
                self._apply_node(item, value)
            elif kind == "quotas":
                self._apply_quota(item, value)
            elif name == "config" and value is not None:
                self.settings = ClusterSettings(**json.loads(value))
        except (ValueError, TypeError, ClusterError) as exc:
            log.warning("ignoring malformed cluster entry %s: %s", name, exc)

    def _apply_node(self, node_id: str, value: bytes | None) -> None:
        if value is None:
            self.nodes.pop(node_id, None)
        else:
            self.nodes[node_id] = NodeInfo.from_json(value)

    def _apply_quota(self, group: str, value: bytes | None) -> None:
        if value is None:
            self.quotas.pop(group, None)
        else:
            self.quotas[group] = json.loads(value)

    def _notify(self) -> None:
        for listener in self.listeners:
            listener(self)

    async def wait_until(
        self, predicate: Callable[[Membership], bool], timeout: float
    ) -> bool:
        """Waits for the view to satisfy ``predicate``; False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task

    # ------------------------------------------------------------- settings

    async def ensure_settings(self, settings: ClusterSettings) -> ClusterSettings:
        """Writes ``settings`` if the cluster has none yet; returns the cluster's."""
        key = self.root + b"config"
        if await self.etcd.put_if_absent(key, json.dumps(asdict(settings)).encode()):
            return settings
        current = await self.etcd.get(key)
        return ClusterSettings(**json.loads(current)) if current else settings

    async def set_settings(self, settings: ClusterSettings) -> None:
        await self.etcd.put(
            self.root + b"config", json.dumps(asdict(settings)).encode()
        )

    async def set_quota(self, group: str, quota: dict[str, int | None]) -> None:
        await self.etcd.put(
            self.root + b"quotas/" + group.encode(), json.dumps(quota).encode()
        )
