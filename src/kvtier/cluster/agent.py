"""A node's part in a cluster: register, follow the cluster, apply its quotas.

The agent registers the node under its lease, makes sure the cluster has settings
(replication factor, write quorum), follows membership and quotas, and applies quota
changes to the local store. On shutdown it leaves first, so clients stop routing to the
node before it stops answering.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from kvtier import __version__
from kvtier.cluster.etcd import Etcd
from kvtier.cluster.membership import ClusterSettings, Membership, NodeInfo

if TYPE_CHECKING:
    from kvtier.server.node import Node

__all__ = ["ClusterAgent"]

log = logging.getLogger(__name__)


class ClusterAgent:
    """Joins ``node`` to the cluster its configuration names."""

    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.config.cluster
        self.etcd = Etcd(cfg.endpoints)
        self.membership = Membership(self.etcd, cfg.name)
        self.membership.listeners.append(self._apply_quotas)

    async def join(self) -> None:
        cfg = self.node.config.cluster
        await self.etcd.connect()
        await self.membership.ensure_settings(
            ClusterSettings(cfg.replicas, cfg.write_quorum)
        )
        await self.membership.register(self.info(), cfg.lease_ttl)
        await self.membership.start_watching()
        log.info("joined cluster %s as %s", cfg.name, self.node.node_id)

    async def leave(self) -> None:
        await self.membership.deregister()
        await self.membership.stop()
        await self.etcd.close()

    def info(self) -> NodeInfo:
        config = self.node.config
        host, port = self.node.address
        advertise = config.cluster.advertise or f"{_reachable(host)}:{port}"
        http = (
            f"{_reachable(host)}:{config.server.http_port}"
            if config.server.http_port
            else ""
        )
        capacity = config.memory.capacity_bytes
        if config.disk.enabled:
            capacity += config.disk.capacity_bytes
        return NodeInfo(
            node_id=self.node.node_id,
            address=advertise,
            http=http,
            zone=config.cluster.zone,
            capacity_bytes=capacity,
            version=__version__,
            started_at=time.time(),
        )

    def _apply_quotas(self, membership: Membership) -> None:
        for group, quota in membership.quotas.items():
            self.node.store.set_quota(
                group, quota.get("memory_bytes"), quota.get("disk_bytes")
            )

    def view(self) -> dict[str, Any]:
        """The cluster as this node sees it (``/v1/cluster``)."""
        membership = self.membership
        return {
            "cluster": membership.cluster,
            "self": self.node.node_id,
            "revision": membership.revision,
            "settings": vars(membership.settings),
            "nodes": [vars(info) for info in membership.nodes.values()],
            "quotas": membership.quotas,
        }


def _reachable(host: str) -> str:
    """A listen address clients can use: the host name for a wildcard address."""
    return socket.gethostname() if host in ("", "0.0.0.0", "::") else host
