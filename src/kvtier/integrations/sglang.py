"""SGLang's HiCache storage backend (the L3 tier under its host KV pool) on kvtier.

::

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvtier",
            "module_path": "kvtier.integrations.sglang",
            "class_name": "KVTierHiCacheStorage", "server": "127.0.0.1:7480"}'

SGLang hands the backend pages of its host pool under string keys (a SHA-256 chain
over the page's tokens and every page before it); kvtier stores each page as one raw
block under that key folded into its namespace (model, tensor-parallel rank unless the
model is MLA, whose KV every rank shares, tenant), so two models or ranks never
collide. The extra config's other keys are kvtier configuration, as for vLLM:
``server``, ``tenant``, ``"section.key"`` entries, ``config`` (a YAML file).

Every call degrades instead of raising, as HiCache expects of a storage tier: a read
that fails is a miss (``None``), a write that fails is ``False``. ``batch_exists``
answers in one request: the length of the run of leading pages stored, which is how
far a prefix can be fetched.

Imports without SGLang; SGLang's dynamic loader needs the class to subclass its
``HiCacheStorage``, which it does whenever SGLang is installed.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kvtier.core.keys import BlockKey, Namespace, engine_keys
from kvtier.errors import KVTierError
from kvtier.integrations.backend import (
    KVBackend,
    close_backend,
    engine_config,
    open_backend,
)

__all__ = ["KVTierHiCacheStorage"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_LOADER_KEYS = ("backend_name", "module_path", "class_name")


def _storage_base() -> Any:
    try:
        module = importlib.import_module("sglang.srt.mem_cache.hicache_storage")
    except ImportError:
        return object
    return module.HiCacheStorage


class KVTierHiCacheStorage(_storage_base()):  # type: ignore[misc]
    """A HiCache storage backend over a kvtier node or embedded store.

    Args:
        storage_config: SGLang's ``HiCacheStorageConfig`` (ranks, model name,
            ``extra_config``); anything with those attributes.
        kwargs: What SGLang's factory passes along (unused).
        backend: A store or client to use instead of opening one (tests).
    """

    def __init__(
        self,
        storage_config: Any,
        kwargs: dict[str, Any] | None = None,
        *,
        backend: KVBackend | None = None,
    ) -> None:
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        config = engine_config(
            {k: v for k, v in extra.items() if k not in _LOADER_KEYS}
        )
        self.namespace = _namespace(
            storage_config, config.engine.model_id, config.engine.tenant
        )
        self._owned = backend is None
        self.backend: KVBackend = (
            backend if backend is not None else open_backend(config)
        )

    def _keys(self, keys: Sequence[str]) -> list[BlockKey]:
        """Each page key folded into the namespace on its own (SGLang's keys chain
        already; a page is fetched by its key alone)."""
        return [engine_keys(self.namespace, [key.encode()])[0] for key in keys]

    def _safe(self, what: str, call: Callable[[], _T], failed: _T) -> _T:
        try:
            return call()
        except KVTierError as exc:
            log.warning("kvtier %s failed: %s", what, exc)
            return failed

    def get(
        self,
        key: str,
        target_location: Any = None,
        target_sizes: Any = None,
    ) -> Any:
        """The page under ``key``, read into ``target_location`` when given."""
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> list[Any]:
        """Pages under ``keys`` (``None`` for each one not stored)."""
        targets = list(target_locations or [None] * len(keys))
        return [
            self._get_one(key, target)
            for key, target in zip(keys, targets, strict=True)
        ]

    def _get_one(self, key: str, target: Any) -> Any:
        block_key = self._keys([key])
        if target is None:  # a new uint8 tensor of the page's bytes
            import torch

            none: list[Any] = []
            blocks = self._safe("get", lambda: self.backend.get(block_key), none)
            return torch.from_numpy(blocks[0]) if blocks else None
        got = self._safe("get", lambda: self.backend.get_into(block_key, [target]), 0)
        return target if got == 1 else None

    def set(
        self,
        key: str,
        value: Any = None,
        target_location: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        """Stores one page; ``False`` when it could not be stored."""
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        """Stores pages; ``True`` when every one is stored."""
        pages = [v.contiguous() for v in values or []]
        result = self._safe(
            "set", lambda: self.backend.put(self._keys(keys), pages), None
        )
        return bool(result)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many leading pages of ``keys`` are stored (one request)."""
        none: list[bool] = []
        present = self._safe(
            "exists", lambda: self.backend.contains(self._keys(keys)), none
        )
        run = 0
        for stored in present:
            if not stored:
                break
            run += 1
        return run

    def clear(self) -> None:
        """Not supported: pages of other SGLang instances share the store."""
        log.info("kvtier HiCache backend: clear() leaves shared pages in place")

    def get_stats(self) -> Any:
        return None

    def close(self) -> None:
        if self._owned:
            close_backend(self.backend)


def _namespace(storage_config: Any, model_id: str, tenant: str) -> Namespace:
    mla = bool(getattr(storage_config, "is_mla_model", False))
    tp_size = 1 if mla else int(getattr(storage_config, "tp_size", 1))
    tp_rank = 0 if mla else int(getattr(storage_config, "tp_rank", 0))
    model = model_id or str(getattr(storage_config, "model_name", "") or "model")
    pp_size = int(getattr(storage_config, "pp_size", 1))
    stage = (
        f"-pp{getattr(storage_config, 'pp_rank', 0)}of{pp_size}" if pp_size > 1 else ""
    )
    return Namespace(
        f"{model}#sglang{stage}",
        layout_id="sglang-page",
        block_tokens=int(getattr(storage_config, "logical_page_size", None) or 1),
        tp_rank=tp_rank,
        tp_size=tp_size,
        tenant=tenant,
    )
