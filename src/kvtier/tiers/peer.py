"""Another kvtier node as a shared tier (``kvtier://host:7480?token=...``).

Blocks go to the peer with the client's PUT and come back with its exact GET; the
peer verifies nothing extra because the binary protocol carries raw blocks between two
kvtier stores that both checksum what leaves their memory. A peer that cannot be
reached raises a :class:`~kvtier.errors.NodeError`, which the health guard turns into
misses. The client connects on first use, so a node can list a peer that starts later.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey, KeyChain
from kvtier.errors import ConfigError
from kvtier.tiers.remote import RemoteURL

__all__ = ["PeerTier"]


class PeerTier:
    """Blocks on another node."""

    name = "kvtier"

    def __init__(self, url: str) -> None:
        parsed = RemoteURL.parse(url, default_port=7480)
        if len(parsed.hosts) != 1:
            raise ConfigError(f"{url}: name one peer, kvtier://host:port")
        host, port = parsed.hosts[0]
        self.address = f"{host}:{port}"
        self.token = parsed.options.get("token")
        self._client: Any = None
        self._lock = threading.Lock()

    def _peer(self) -> Any:
        with self._lock:
            if self._client is None:
                from kvtier.client import Client

                self._client = Client(
                    self.address,
                    token=self.token,
                    shared_memory=False,
                    timeout=5.0,
                    retries=0,
                )
            return self._client

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        by_group: dict[str, list[int]] = defaultdict(list)
        for i, (_, _, meta) in enumerate(items):
            by_group[meta.group].append(i)
        stored = [False] * len(items)
        for group, idx in by_group.items():
            keys = KeyChain(
                [items[i][0] for i in idx],
                None,
                group=group,
                parents=[items[i][2].parent for i in idx],
            )
            result = self._peer().put(keys, [items[i][1] for i in idx])
            for i, ok in zip(idx, result.stored, strict=True):
                stored[i] = ok
        return stored

    def get(
        self, key: BlockKey, now: float | None = None
    ) -> np.ndarray[Any, Any] | None:
        block: np.ndarray[Any, Any] | None = self._peer().get_blocks([key])[0]
        return block

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        present: list[bool] = self._peer().contains(keys)
        return present

    def delete(self, keys: Sequence[BlockKey]) -> int:
        removed: int = self._peer().delete(keys)
        return removed

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
