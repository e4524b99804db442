"""kvtier: a tiered, distributed store for the attention KV cache of LLM inference.

Embedded use::

    import kvtier

    layout = kvtier.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128)
    ns = kvtier.Namespace("meta-llama/Llama-3.1-8B", layout_id=layout.layout_id)
    with kvtier.open() as store:
        keys = kvtier.block_keys(ns, token_ids)
        hit = store.match(keys)                      # leading blocks stored, and where
        blocks = store.get(keys[: hit.num_blocks], layout=layout)
        store.put(keys[hit.num_blocks :], new_blocks, layout=layout)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kvtier.aio import AsyncTieredStore
from kvtier.client import AsyncClient, Client, ClusterClient
from kvtier.config import Config, load_config
from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey, KeyChain, Namespace, block_keys, engine_keys
from kvtier.errors import (
    AuthenticationError,
    ClusterError,
    ConfigError,
    ConnectionLostError,
    CorruptBlockError,
    EventFormatError,
    KeyFormatError,
    KVTierError,
    LayoutError,
    NodeError,
    ProtocolError,
    RemoteError,
    RequestTimeoutError,
    RouteError,
    StorageError,
    StoreClosedError,
    TraceFormatError,
    UnknownPodError,
)
from kvtier.layout import KVLayout, to_torch
from kvtier.results import (
    BlockInfo,
    BlockLease,
    Match,
    PutResult,
    StoreStats,
    TierStats,
)
from kvtier.store import TieredStore

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncClusterClient",
    "AsyncTieredStore",
    "AuthenticationError",
    "BlockInfo",
    "BlockKey",
    "BlockLease",
    "BlockMeta",
    "Client",
    "ClusterClient",
    "ClusterError",
    "Config",
    "ConfigError",
    "ConnectionLostError",
    "CorruptBlockError",
    "EventFormatError",
    "KVLayout",
    "KVTierError",
    "KeyChain",
    "KeyFormatError",
    "LayoutError",
    "Match",
    "Namespace",
    "NodeError",
    "ProtocolError",
    "PutResult",
    "RemoteError",
    "RequestTimeoutError",
    "RouteError",
    "StorageError",
    "StoreClosedError",
    "StoreStats",
    "TierStats",
    "TieredStore",
    "TraceFormatError",
    "UnknownPodError",
    "__version__",
    "block_keys",
    "engine_keys",
    "load_config",
    "open",
    "open_async",
    "to_torch",
]


def __getattr__(name: str) -> Any:
    if name == "AsyncClusterClient":  # needs the cluster extra: imported on use
        from kvtier.client.cluster import AsyncClusterClient

        return AsyncClusterClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open(  # noqa: A001 - mirrors the built-in's role for a store, like shelve.open
    config: Config | str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TieredStore:
    """Opens an embedded store.

    Args:
        config: A :class:`Config`, a YAML file, or ``None`` for the defaults plus the
            ``KVTIER_*`` environment (memory + disk under ``./kvtier-data``).
        overrides: ``{"section.key": value}`` applied last, e.g.
            ``{"memory.capacity_bytes": "8GiB"}``.

    Raises:
        ConfigError: The configuration is not valid.
        StorageError: The data directory cannot be opened.
    """
    if isinstance(config, Config):
        resolved = config.replace(overrides) if overrides else config
    else:
        resolved = load_config(config, overrides=overrides)
    return TieredStore(resolved)


def open_async(
    config: Config | str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AsyncTieredStore:
    """Like :func:`open`, with awaitable methods."""
    return AsyncTieredStore(open(config, overrides))
