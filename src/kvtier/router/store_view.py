"""The shared kvtier store, as the router sees it: how many leading blocks it holds.

Every pod can load from the shared store, so its prefix counts for all of them (at a
lower weight than a pod's own GPU or CPU copy). The router needs one call::

    await view.match(keys) -> number of leading blocks stored

:class:`EmbeddedStoreView` answers from a :class:`~kvtier.TieredStore` in this
process; :class:`HttpStoreView` asks a kvtier node over its HTTP API::

    POST /v1/match  {"keys": ["<32 hex digits>", ...]}
    ->  200 {"num_blocks": n, "tiers": ["memory", "disk", ...]}

Both raise only :class:`~kvtier.errors.StorageError`; the router then counts no store
blocks and routes on (a cache that cannot answer is a miss, not an outage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import aiohttp

from kvtier.aio import AsyncTieredStore
from kvtier.core.keys import BlockKey, key_hex
from kvtier.errors import KVTierError, StorageError
from kvtier.store import TieredStore

__all__ = ["EmbeddedStoreView", "HttpStoreView", "StoreView"]


class StoreView(Protocol):
    """What the router asks of the shared store."""

    async def match(self, keys: Sequence[BlockKey]) -> int:
        """Leading blocks of ``keys`` the store holds.

        Raises:
            StorageError: The store could not answer.
        """
        ...

    async def close(self) -> None: ...


class EmbeddedStoreView:
    """A :class:`~kvtier.TieredStore` in this process (closed with the view)."""

    def __init__(self, store: TieredStore) -> None:
        self._store = AsyncTieredStore(store)

    async def match(self, keys: Sequence[BlockKey]) -> int:
        try:
            return (await self._store.match(keys)).num_blocks
        except KVTierError as exc:
            raise StorageError(f"the embedded store could not match: {exc}") from exc

    async def close(self) -> None:
        await self._store.close()


class HttpStoreView:
    """A kvtier node's ``POST /v1/match``, over one pooled aiohttp session.

    Args:
        url: The node's base URL, e.g. ``http://10.0.0.5:8780``.
        timeout_seconds: Longest wait for one answer.
        token: The node's bearer token (``server.auth_token``), if it has one.
    """

    def __init__(self, url: str, timeout_seconds: float, token: str = "") -> None:
        self._url = url.rstrip("/") + "/v1/match"
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def match(self, keys: Sequence[BlockKey]) -> int:
        body = {"keys": [key_hex(key) for key in keys]}
        try:
            async with self._client().post(self._url, json=body) as response:
                if response.status != 200:
                    text = (await response.text())[:200]
                    raise StorageError(
                        f"{self._url} answered {response.status}: {text}"
                    )
                answer = await response.json()
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise StorageError(f"{self._url} did not answer: {exc!r}") from exc
        return _num_blocks(answer, len(keys), self._url)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers=self._headers
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _num_blocks(answer: Any, num_keys: int, url: str) -> int:
    num = answer.get("num_blocks") if isinstance(answer, dict) else None
    if type(num) is not int or not 0 <= num <= num_keys:
        raise StorageError(
            f"{url} answered {answer!r:.200}; expected num_blocks in [0, {num_keys}]"
        )
    return num
