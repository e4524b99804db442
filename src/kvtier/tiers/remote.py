"""Shared tiers by URL, below the local ones, and the health guard around each.

| URL | tier |
| --- | --- |
| ``file:///mnt/kv?capacity_bytes=1TiB`` | a directory several nodes mount (shared_fs) |
| ``redis://host:6379/0``, ``rediss://...`` | Redis or Valkey |
| ``redis+sentinel://h1:26379,h2:26379/mymaster`` | Redis behind Sentinel |
| ``redis+cluster://h1:7000,h2:7001`` | a Redis Cluster |
| ``s3://bucket/prefix?endpoint_url=http://h:9000`` | S3 or an S3-compatible store |
| ``kvtier://host:7480?token=...`` | another kvtier node (a peer) |

Every remote tier stores blocks as records (``_record.py``: header with key, sizes,
codec, expiry and checksum, then the payload), so a block read back is verified the
same way wherever it lived, and a corrupt or truncated one is a miss.

Each tier sits behind a :class:`Guarded` wrapper (seed 002's availability-based
selection): a tier whose calls fail is marked down and skipped (reads miss, writes are
refused) for ``retry_after`` seconds, doubling while it stays down, then tried again.
A dead Redis or S3 therefore costs the store one failed call per interval, never a
stalled request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np

from kvtier.config import parse_bytes
from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.errors import ConfigError, KVTierError

__all__ = ["Guarded", "RemoteTier", "RemoteURL", "open_remote"]

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
_T = TypeVar("_T")


class RemoteTier(Protocol):
    """What the store needs of a tier below its local ones."""

    @property
    def name(self) -> str:
        """The tier's kind, as stats and matches name it (redis, s3, ...)."""

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        """Stores blocks; per item whether it is stored."""

    def get(self, key: BlockKey, now: float | None = None) -> Array | None:
        """The verified block, or ``None`` (absent, expired, corrupt)."""

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """For each key, whether the tier stores it."""

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Removes blocks; returns how many were stored."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class RemoteURL:
    """A parsed tier URL: scheme, hosts, path and ``?key=value`` options."""

    url: str
    scheme: str
    hosts: list[tuple[str, int]]
    path: str
    options: dict[str, str]

    @classmethod
    def parse(cls, url: str, default_port: int = 0) -> RemoteURL:
        parts = urlsplit(url)
        hosts = []
        for item in filter(None, parts.netloc.rpartition("@")[2].split(",")):
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
            hosts.append((host or item, int(port) if port else default_port))
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return cls(url, parts.scheme, hosts, parts.path, options)

    def size(self, name: str) -> int | None:
        value = self.options.get(name)
        return None if value is None else parse_bytes(value, f"{self.url} {name}")


_SCHEMES = (
    "file",
    "redis",
    "rediss",
    "redis+sentinel",
    "redis+cluster",
    "s3",
    "kvtier",
)


def open_remote(
    url: str, *, compression: str = "none", retry_after: float = 1.0
) -> Guarded:
    """The tier a URL names, behind its health guard.

    Raises:
        ConfigError: An unknown scheme, or a URL its tier cannot use.
    """
    scheme = url.partition("://")[0]
    if scheme == "file":
        from kvtier.tiers.shared_fs import SharedFSTier

        parsed = RemoteURL.parse(url)
        tier: RemoteTier = SharedFSTier(
            parsed.path,
            capacity_bytes=parsed.size("capacity_bytes"),
            compression=parsed.options.get("compression", compression),
            fsync=parsed.options.get("fsync", "") in ("1", "true", "yes"),
        )
    elif scheme.startswith("redis"):
        from kvtier.tiers.redis import RedisTier

        tier = RedisTier(url, compression=compression)
    elif scheme == "s3":
        from kvtier.tiers.s3 import S3Tier

        tier = S3Tier(url, compression=compression)
    elif scheme == "kvtier":
        from kvtier.tiers.peer import PeerTier

        tier = PeerTier(url)
    else:
        raise ConfigError(
            f"remote.urls: {url!r} has no known scheme; use one of "
            f"{', '.join(s + '://' for s in _SCHEMES)}"
        )
    return Guarded(tier, retry_after=retry_after)


class Guarded:
    """A remote tier that is skipped while it fails (reads miss, writes refused)."""

    def __init__(
        self,
        tier: RemoteTier,
        retry_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tier = tier
        self.name = tier.name
        self.retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = retry_after
        self.errors = 0

    @property
    def healthy(self) -> bool:
        return self._clock() >= self._down_until

    def _call(self, fallback: _T, fn: Callable[..., _T], *args: Any) -> _T:
        if not self.healthy:
            return fallback
        try:
            result = fn(*args)
        except (KVTierError, OSError) as exc:
            self._mark_down(exc)
            return fallback
        self._backoff = self.retry_after
        return result

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            self._down_until = self._clock() + self._backoff
            log.warning(
                "remote tier %s is down for %.1f s: %s", self.name, self._backoff, exc
            )
            self._backoff = min(self._backoff * 2, 30.0)

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        return self._call([False] * len(items), self.tier.write, items)

    def get(self, key: BlockKey, now: float | None = None) -> Array | None:
        return self._call(None, self.tier.get, key, now)

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        return self._call([False] * len(keys), self.tier.contains, keys)

    def delete(self, keys: Sequence[BlockKey]) -> int:
        return self._call(0, self.tier.delete, keys)

    def close(self) -> None:
        try:
            self.tier.close()
        except (KVTierError, OSError) as exc:
            log.warning("closing remote tier %s: %s", self.name, exc)
