"""vLLM's V1 KV connector for kvtier: repeated prefixes skip prefill.

::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"server": "127.0.0.1:7480"}}'

``kv_connector_extra_config`` holds kvtier configuration: ``"config"`` names a YAML
file, ``"section.key"`` entries set any key (``"store.block_tokens": 256``), bare keys
set the ``engine`` section (``server``, ``token``, ``tenant``, ``model_id``). Without
``server`` each vLLM process opens an embedded store; with one, the scheduler and every
worker talk to that node (through shared memory on the same host).

The scheduler half (``_vllm_scheduler``) answers ``get_num_new_matched_tokens`` from a
kvtier match over vLLM's own block hashes (``request.block_hashes``, folded into
kvtier's namespace), and plans each step's loads and saves; the worker half
(``_vllm_worker``) moves the bytes between vLLM's pages and kvtier, in whichever page
layout this vLLM hands out (``paged.py``). kvtier is a best-effort cache:
``requires_kv_delivery`` is False, loads are synchronous, a failed load is reported
(never served), a failed save is a future miss.

This module imports without vLLM installed (kvtier's own tests, users of the other
engines); only building the connector needs it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvtier.config import Config
from kvtier.core.keys import Namespace
from kvtier.errors import ConfigError, LayoutError
from kvtier.integrations._torch import dtype_name
from kvtier.integrations._vllm_scheduler import SchedulerSide, Transfer
from kvtier.integrations._vllm_worker import WorkerSide, layer_tensors
from kvtier.integrations.backend import Blocks, engine_config, open_backend
from kvtier.integrations.paged import PagedFormat, PagedKV
from kvtier.layout import KVLayout

__all__ = ["FINISHED_PARAM", "KVTierConnector", "KVTierMetadata", "vllm_layout"]

log = logging.getLogger(__name__)

FINISHED_PARAM = "kvtier_finished"
"""A request's ``kv_transfer_params`` key: true on a conversation's last turn, so the
store lets the blocks only that conversation holds go first once the request ends."""


def _vllm_base() -> Any:
    """vLLM's connector base module, or ``None`` when vLLM is not installed."""
    try:
        return importlib.import_module(
            "vllm.distributed.kv_transfer.kv_connector.v1.base"
        )
    except ImportError:
        return None


class _NeedsVLLM:
    """Stands in for vLLM's base classes when vLLM is missing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError("KVTierConnector needs vLLM: pip install vllm")


_base = _vllm_base()
_ConnectorBase: Any = _base.KVConnectorBase_V1 if _base else _NeedsVLLM
_MetadataBase: Any = _base.KVConnectorMetadata if _base else object


@dataclass
class KVTierMetadata(_MetadataBase):  # type: ignore[misc]
    """One step's plan, sent from the scheduler to every worker (pickles)."""

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass(frozen=True)
class _Settings:
    """What both halves derive from vLLM's configuration and kvtier's."""

    config: Config
    namespace: Namespace
    layout: KVLayout
    engine_block_size: int
    layer_names: tuple[str, ...]
    prefer: tuple[PagedFormat, ...]


def vllm_layout(kv_cache_config: Any, block_tokens: int) -> tuple[KVLayout, Any]:
    """kvtier's block layout for vLLM's (single) KV-cache group, and its spec.

    Raises:
        LayoutError: Several KV-cache groups (hybrid models), or K and V of
            different head sizes.
    """
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise LayoutError(
            f"KVTierConnector supports one KV-cache group, got {len(groups)} "
            "(hybrid attention models are not supported yet)"
        )
    spec = groups[0].kv_cache_spec
    mla = "MLA" in type(spec).__name__
    head_size_v = getattr(spec, "head_size_v", None) or spec.head_size
    if not mla and head_size_v != spec.head_size:
        raise LayoutError(
            f"K and V head sizes differ ({spec.head_size} vs {head_size_v}); "
            "kvtier blocks need one head size"
        )
    layout = KVLayout(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=1 if mla else spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=dtype_name(spec.dtype),
        block_tokens=block_tokens,
        kv_parts=1 if mla else 2,
    )
    return layout, spec


def _settings(vllm_config: Any, kv_cache_config: Any, worker: bool) -> _Settings:
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    config = engine_config(dict(extra))
    cache = vllm_config.cache_config
    block_size = int(cache.block_size)
    block_tokens = config.store.block_tokens
    hash_block_size = getattr(cache, "hash_block_size", None) or block_size
    if block_tokens % block_size or hash_block_size != block_size:
        raise ConfigError(
            f"store.block_tokens ({block_tokens}) must be a multiple of vLLM's "
            f"block_size ({block_size}), which must equal its hash_block_size"
        )
    layout, _ = vllm_layout(kv_cache_config, block_tokens)
    parallel = vllm_config.parallel_config
    model = config.engine.model_id or str(vllm_config.model_config.model)
    namespace = Namespace(
        # vLLM's hashes depend on its hash algorithm: blocks of two must not mix.
        f"{model}#vllm-{cache.prefix_caching_hash_algo}",
        layout_id=layout.layout_id,
        block_tokens=block_tokens,
        tp_rank=_tp_rank() if worker else 0,
        tp_size=int(parallel.tensor_parallel_size),
        tenant=config.engine.tenant,
    )
    return _Settings(
        config,
        namespace,
        layout,
        block_size,
        tuple(kv_cache_config.kv_cache_groups[0].layer_names),
        _preferred_formats(),
    )


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # not initialised: a single-process worker (tests)
        return 0


def _preferred_formats() -> tuple[PagedFormat, ...]:
    """For a shape two formats fit: the one this vLLM release hands out."""
    try:
        import vllm

        major, minor = (int(p) for p in vllm.__version__.split(".")[:2])
    except Exception:
        return ("page_first",)
    return ("kv_first",) if (major, minor) < (0, 24) else ("page_first",)


class KVTierConnector(_ConnectorBase):  # type: ignore[misc]
    """kvtier as vLLM's KV connector (``KVConnectorBase_V1``).

    Built by vLLM, once for the scheduler and once per worker, from
    ``--kv-transfer-config`` (see the module docstring).
    """

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._is_worker = getattr(role, "name", str(role)) == "WORKER"
        self._settings = _settings(vllm_config, kv_cache_config, self._is_worker)
        cuda = str(getattr(vllm_config.device_config, "device", "cuda")) != "cpu"
        self._blocks = Blocks(
            open_backend(self._settings.config), owned=True, pin_for_cuda=cuda
        )
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if not self._is_worker:
            self._scheduler = SchedulerSide(
                self._blocks,
                self._settings.namespace,
                self._settings.layout.block_tokens,
                self._settings.engine_block_size,
            )

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache: a save that never happens is a later miss, not a loss."""
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """No per-layer hooks: whole CUDA graphs are fine."""
        return False

    # ---------------------------------------------------------- scheduler

    def _sched(self) -> SchedulerSide:
        assert self._scheduler is not None, "a scheduler call on a worker connector"
        return self._scheduler

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Any, blocks: Any, num_external_tokens: int
    ) -> None:
        self._sched().after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVTierMetadata:
        plan = self._sched().build(scheduler_output)
        return KVTierMetadata(plan.loads, plan.saves)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        params = getattr(request, "kv_transfer_params", None) or {}
        self._sched().finished(
            request.request_id, conversation_over=bool(params.get(FINISHED_PARAM))
        )
        return False, None  # saves are done by now: vLLM may free the blocks

    def take_events(self) -> Iterable[Any]:
        """``BlockStored`` events (medium ``"kvtier"``) for the blocks saved."""
        from vllm.distributed.kv_events import BlockStored
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        for stored in self._sched().take_stored():
            parent = stored.parent_hash
            yield BlockStored(
                block_hashes=[
                    maybe_convert_block_hash(h) for h in stored.engine_hashes
                ],
                parent_block_hash=(
                    maybe_convert_block_hash(parent) if parent is not None else None
                ),
                token_ids=list(stored.token_ids),
                block_size=self._settings.engine_block_size,
                lora_id=None,
                medium="kvtier",
                lora_name=None,
            )

    # ------------------------------------------------------------- worker

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Detects the page layout (refusing one it does not know) and keeps it."""
        layout = self._settings.layout
        paged = PagedKV(
            layer_tensors(kv_caches, self._settings.layer_names),
            num_kv_heads=layout.num_kv_heads,
            head_size=layout.head_dim,
            block_size=self._settings.engine_block_size,
            kv_parts=layout.kv_parts,
            prefer=self._settings.prefer,
        )
        found = paged.block_layout(layout.block_tokens)
        if found != layout:
            raise LayoutError(
                f"vLLM's KV cache tensors hold {found} but its KV-cache spec says "
                f"{layout}"
            )
        log.info("kvtier: vLLM KV cache pages are %s", paged.format)
        self._worker = WorkerSide(
            self._blocks, self._settings.namespace, layout.block_tokens, paged
        )

    def _work(self) -> WorkerSide | None:
        return self._worker

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        worker = self._work()
        if worker is not None and self.has_connector_metadata():
            worker.load(self._get_connector_metadata().loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: every layer was loaded before the forward pass."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """Nothing per layer: whole blocks are saved in :meth:`wait_for_save`."""

    def wait_for_save(self) -> None:
        worker = self._work()
        if worker is not None and self.has_connector_metadata():
            worker.save(self._get_connector_metadata().saves)

    def get_block_ids_with_load_errors(self) -> set[int]:
        worker = self._work()
        return worker.take_load_errors() if worker is not None else set()

    def shutdown(self) -> None:
        self._blocks.close()
