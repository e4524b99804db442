"""The store an engine integration talks to, embedded or a node, behind one protocol.

:class:`KVBackend` is the part of the store API the integrations use; an embedded
:class:`~kvtier.TieredStore` and a :class:`~kvtier.Client` of a node both satisfy it,
so every integration works against either. :class:`Blocks` wraps one with what the
integrations add: reading blocks in place, and page-locking the arena for CUDA.

Reading in place: when the memory arena is in reach (the embedded store, or a node on
the same host through shared memory) blocks are leased and copied once, straight from
the arena into the engine's tensors; a GPU reads them by DMA when the arena is
page-locked. Elsewhere blocks arrive through ``get_into`` into one scratch buffer. A
block that disappears between a match and the read (evicted, expired, corrupt) simply
ends the run of blocks read, and the caller computes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kvtier._pinning import pin_for_cuda, unpin
from kvtier.client import Client, ClusterClient, RemoteLease
from kvtier.config import Config, load_config
from kvtier.core.keys import BlockKey
from kvtier.errors import ConfigError, KVTierError
from kvtier.layout import KVLayout
from kvtier.results import BlockLease, Match, PutResult
from kvtier.store import TieredStore

__all__ = [
    "Blocks",
    "ConfigSource",
    "KVBackend",
    "close_backend",
    "engine_config",
    "open_backend",
]

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
Sink = Callable[[int, Array], None]

# Blocks read without the arena in reach land in a scratch buffer of about this size,
# one request per batch.
_SCRATCH_BYTES = 64 << 20


@runtime_checkable
class KVBackend(Protocol):
    """What the integrations need of a store: ``TieredStore`` and ``Client`` fit."""

    def match(
        self, keys: Sequence[BlockKey], *, window: int | None = None
    ) -> Match: ...

    def put(
        self,
        keys: Sequence[BlockKey],
        blocks: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> PutResult: ...

    def get(
        self, keys: Sequence[BlockKey], *, layout: KVLayout | None = None
    ) -> list[Array]: ...

    def get_into(
        self,
        keys: Sequence[BlockKey],
        outs: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> int: ...

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]: ...

    def finish(self, keys: Sequence[BlockKey]) -> None: ...

    def close(self) -> None: ...


ConfigSource = Config | str | os.PathLike[str] | Mapping[str, Any] | None


def engine_config(source: ConfigSource = None) -> Config:
    """The configuration an integration runs with.

    Args:
        source: A :class:`~kvtier.Config`; a YAML file; ``None`` for the defaults
            and the ``KVTIER_*`` environment; or a mapping as engines pass extra
            configuration (vLLM's ``kv_connector_extra_config``): ``"config"`` names
            a YAML file, ``"section.key"`` entries set any key, and bare keys set
            the ``engine`` section (``{"server": "10.0.0.5:7480"}``).

    Raises:
        ConfigError: An unknown key or a value that is not allowed.
    """
    if isinstance(source, Config):
        return source
    if source is None or isinstance(source, str | os.PathLike):
        return load_config(source)
    overrides: dict[str, Any] = {}
    path = None
    for key, value in source.items():
        if key == "config":
            path = value
        elif "." in key:
            overrides[key] = value
        else:
            overrides[f"engine.{key}"] = value
    return load_config(path, overrides=overrides)


def open_backend(config: Config) -> KVBackend:
    """A node client when ``engine.server`` is set, a cluster client when
    ``cluster.name`` is (nodes found through ``cluster.etcd``), else an embedded store.

    Embedded stores are shared per process and configuration: an engine builds
    several integration objects in one process (vLLM's scheduler and its worker,
    with one GPU), and one data directory can be opened by one store only. Give
    the backend back with :func:`close_backend`.

    Raises:
        ConnectionLostError: The node cannot be reached.
        StorageError: The embedded store's data directory cannot be opened.
    """
    if config.engine.server:
        return Client(config.engine.server, token=config.engine.token or None)
    if config.cluster.name:
        return ClusterClient(
            config.cluster.endpoints,
            config.cluster.name,
            token=config.engine.token or None,
        )
    name = json.dumps(config.as_dict(), sort_keys=True, default=str)
    with _embedded_lock:
        store, users = _embedded.get(name, (None, 0))
        if store is None:
            store = TieredStore(config)
        _embedded[name] = (store, users + 1)
    return store


def close_backend(backend: KVBackend) -> None:
    """Closes what :func:`open_backend` opened (a shared store on its last user)."""
    with _embedded_lock:
        for name, (store, users) in list(_embedded.items()):
            if store is backend:
                if users > 1:
                    _embedded[name] = (store, users - 1)
                    return
                del _embedded[name]
                break
    backend.close()


_embedded: dict[str, tuple[TieredStore, int]] = {}
_embedded_lock = threading.Lock()


class Blocks:
    """A backend plus in-place reads and CUDA page-locking, closed together.

    Args:
        backend: The store or client.
        owned: Give the backend back (:func:`close_backend`) with this object.
        pin_for_cuda: Page-lock the embedded store's arena so GPU copies from it
            are asynchronous DMA (a node client does that itself on connect).
    """

    def __init__(
        self, backend: KVBackend, *, owned: bool = False, pin_for_cuda: bool = False
    ) -> None:
        if not isinstance(backend, KVBackend):
            raise ConfigError(
                "backend must be a kvtier TieredStore or Client (or offer match, "
                f"put, get_into, contains, finish, close), got "
                f"{type(backend).__name__}"
            )
        self.backend = backend
        self._owned = owned
        self._pinned: int | None = None
        if pin_for_cuda and isinstance(backend, TieredStore):
            self._pinned = _pin_arena(backend)

    def match(self, keys: Sequence[BlockKey]) -> int:
        """Leading blocks stored; a backend that fails counts as a miss."""
        try:
            return self.backend.match(keys).num_blocks
        except KVTierError as exc:
            log.warning("kvtier match failed, computing instead: %s", exc)
            return 0

    def finish(self, keys: Sequence[BlockKey]) -> None:
        """Hints that the prompt ``keys`` is finished (a failure is only logged)."""
        try:
            self.backend.finish(keys)
        except KVTierError as exc:
            log.warning("kvtier finish hint failed: %s", exc)

    def put(
        self, keys: Sequence[BlockKey], blocks: Sequence[Any], layout: KVLayout
    ) -> int:
        """Stores blocks; returns how many are stored (failures are not errors)."""
        try:
            return self.backend.put(keys, blocks, layout=layout).num_stored
        except KVTierError as exc:
            log.warning("kvtier put failed, blocks not cached: %s", exc)
            return 0

    def read(
        self,
        keys: Sequence[BlockKey],
        block_bytes: int,
        sink: Sink,
        wait: Callable[[], None] = lambda: None,
    ) -> int:
        """Hands ``sink(i, flat uint8 block)`` the leading stored blocks of ``keys``.

        The array is valid only during the call and until ``wait()`` returns:
        ``wait`` must finish whatever asynchronous copy ``sink`` started (a CUDA
        stream sync), since the arena slot is released right after.

        Returns:
            How many leading blocks were handed over.
        """
        try:
            done = self._read_leased(keys, sink, wait)
            if done < len(keys):
                done += self._read_copied(keys[done:], block_bytes, sink, wait, done)
            return done
        except KVTierError as exc:
            log.warning("kvtier read failed, computing instead: %s", exc)
            return 0

    def _read_leased(self, keys: Sequence[BlockKey], sink: Sink, wait: Any) -> int:
        """Straight out of leased arena slots; 0 when the copies ended after the
        lease ran out (the slots may have held other blocks by then: the copy path
        then reads them all again, over what the sink was given)."""
        backend = self.backend
        lease: BlockLease | RemoteLease
        if isinstance(backend, TieredStore):
            with backend.lease(keys) as lease:
                done = _drain(lease.views, sink, wait)
        elif isinstance(backend, Client) and backend.shared_memory:
            lease = backend.lease(keys)
            try:
                done = _drain(lease.views, sink, wait)
            finally:
                backend.release(lease)
        else:
            return 0
        if lease.expired():
            log.warning("a read outlived its lease (store.lease_seconds): copying")
            return 0
        return done

    def _read_copied(
        self,
        keys: Sequence[BlockKey],
        block_bytes: int,
        sink: Sink,
        wait: Callable[[], None],
        first: int,
    ) -> int:
        """Through a scratch buffer, a batch of blocks per request."""
        per_batch = max(1, min(len(keys), _SCRATCH_BYTES // block_bytes))
        scratch = np.empty((per_batch, block_bytes), dtype=np.uint8)
        done = 0
        while done < len(keys):
            batch = keys[done : done + per_batch]
            got = self.backend.get_into(batch, list(scratch[: len(batch)]))
            for position in range(got):
                sink(first + done + position, scratch[position])
            wait()
            done += got
            if got < len(batch):
                break
        return done

    def close(self) -> None:
        """Unpins the arena; closes the backend when this object owns it."""
        if self._pinned is not None:
            unpin(self._pinned)
            self._pinned = None
        if self._owned:
            close_backend(self.backend)

    def __enter__(self) -> Blocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(views: Sequence[Array], sink: Sink, wait: Callable[[], None]) -> int:
    for position, view in enumerate(views):
        sink(position, view)
    wait()
    return len(views)


def _pin_arena(store: TieredStore) -> int | None:
    """Page-locks the embedded arena for CUDA when torch sees a GPU."""
    return pin_for_cuda(store.arena_view(0, store.arena_bytes), None)
