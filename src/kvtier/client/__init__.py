"""Clients of kvtier: one node (:class:`AsyncClient`, :class:`Client`) or a whole
cluster (:class:`AsyncClusterClient`, :class:`ClusterClient`), with the store's API.

The cluster clients need the ``cluster`` extra (aetcd); they are imported on first use
so that ``import kvtier`` stays light.
"""

from __future__ import annotations

from typing import Any

from kvtier.client.async_client import AsyncClient, RemoteLease, RemoteReservation
from kvtier.client.sync_client import Client, ClusterClient

__all__ = [
    "AsyncClient",
    "AsyncClusterClient",
    "Client",
    "ClusterClient",
    "RemoteLease",
    "RemoteReservation",
]


def __getattr__(name: str) -> Any:
    if name == "AsyncClusterClient":
        from kvtier.client.cluster import AsyncClusterClient

        return AsyncClusterClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
