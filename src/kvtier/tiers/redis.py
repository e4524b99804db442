"""Redis / Valkey as a shared tier: single server, Sentinel, or Redis Cluster.

Each block is one value, ``kvtier:<key hex>`` -> a record (header + payload, so every
read is verified), written with ``SET NX`` (blocks are content addressed: an existing
value is the same block) and, for blocks that expire, ``PXAT`` so Redis drops them on
time. Batches go through one pipeline; on a Redis Cluster, redis-py splits the pipeline
by slot. Connection failures raise :class:`~kvtier.errors.StorageError`, which the
tier's health guard turns into misses while Redis is down.

Why the synchronous redis-py client: the store calls its tiers from worker threads
(its write-behind writer, promotions), where a blocking client with the hiredis parser
is the direct fit; an asyncio client would need an event loop per thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import redis
import redis.cluster
import redis.sentinel

from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.errors import ConfigError, StorageError
from kvtier.layout import get_codec
from kvtier.tiers import _record
from kvtier.tiers.remote import RemoteURL

__all__ = ["RedisTier"]

_PREFIX = b"kvtier:"
_TIMEOUT_S = 2.0


class RedisTier:
    """Blocks in Redis. ``url``: ``redis://``, ``rediss://``, ``redis+sentinel://``
    (``h1:p1,h2:p2/<master name>``) or ``redis+cluster://`` (``h1:p1,h2:p2``)."""

    name = "redis"

    def __init__(self, url: str, *, compression: str = "none") -> None:
        self.url = url
        self._codec = get_codec(compression)
        self._redis: Any = _connect(url)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise StorageError(f"redis {what} at {self.url} failed: {exc}") from exc

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        with self._errors("write"):
            pipe = self._redis.pipeline(transaction=False)
            for key, block, meta in items:
                value = _record.pack(key, block, self._codec, meta.expire_at)
                expire_ms = (
                    int(meta.expire_at * 1000)
                    if math.isfinite(meta.expire_at)
                    else None
                )
                pipe.set(_PREFIX + key.hex().encode(), value, nx=True, pxat=expire_ms)
            pipe.execute()
        return [True] * len(items)  # stored now, or already (NX)

    def get(
        self, key: BlockKey, now: float | None = None
    ) -> np.ndarray[Any, Any] | None:
        with self._errors("get"):
            value = self._redis.get(_PREFIX + key.hex().encode())
        if value is None:
            return None
        return _record.unpack(value, key, time.time() if now is None else now)

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        with self._errors("exists"):
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(_PREFIX + key.hex().encode())
            return [bool(n) for n in pipe.execute()]

    def delete(self, keys: Sequence[BlockKey]) -> int:
        with self._errors("delete"):
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:  # one key per DEL: cluster slots differ
                pipe.delete(_PREFIX + key.hex().encode())
            return sum(pipe.execute())

    def close(self) -> None:
        self._redis.close()


def _connect(url: str) -> Any:
    scheme = url.partition("://")[0]
    try:
        if scheme in ("redis", "rediss"):
            return redis.Redis.from_url(
                url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S
            )
        parsed = RemoteURL.parse(
            url, default_port=26379 if "sentinel" in scheme else 6379
        )
        if scheme == "redis+sentinel":
            master = parsed.path.strip("/")
            if not master:
                raise ConfigError(f"{url}: name the Sentinel master as the path")
            sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                parsed.hosts, socket_timeout=_TIMEOUT_S
            )
            return sentinel.master_for(  # type: ignore[no-untyped-call]
                master, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S
            )
        if scheme == "redis+cluster":
            nodes = [
                redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
                for h, p in parsed.hosts
            ]
            return redis.cluster.RedisCluster(
                startup_nodes=nodes,
                socket_timeout=_TIMEOUT_S,
                socket_connect_timeout=_TIMEOUT_S,
            )
    except redis.RedisError as exc:
        raise StorageError(f"cannot connect to {url}: {exc}") from exc
    raise ConfigError(
        f"{url}: use redis://, rediss://, redis+sentinel:// or redis+cluster://"
    )
