"""Clients of a kvtier node: :class:`AsyncClient` (asyncio) and :class:`Client`."""

from kvtier.client.async_client import AsyncClient, RemoteLease, RemoteReservation
from kvtier.client.sync_client import Client

__all__ = ["AsyncClient", "Client", "RemoteLease", "RemoteReservation"]
