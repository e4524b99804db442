"""The engine API of seed 000 (distributed-kv-manager), on kvtier.

::

    from kvtier.integrations.engine_api import (
        RetrieveStatus, StoreStatus, destroy_engine, init_engine,
        retrieve_kv, should_retrieve, should_store, store_kv)

    init_engine(config)              # reads config.kv_transfer_config
    if should_retrieve(model_input) == RetrieveStatus.HIT:
        hidden, bypass, model_input = retrieve_kv(model, model_input, kv_caches,
                                                  RetrieveStatus.HIT)
    ... run the model on model_input ...
    if should_store(model_input) == StoreStatus.STORED:
        store_kv(model_config, parallel_config, transfer_config, model,
                 model_input, kv_caches, StoreStatus.STORED)
    destroy_engine()

``kv_caches`` is the engine's paged cache, one tensor per layer in any layout of
``paged.py`` (the seed's vLLM v0 layout, ``(2, blocks, block_size, kv heads, head
dim)``, is the natural one). ``model_input`` is a :class:`ModelInput`, or any object
with ``input_tokens``, ``seq_lens`` and ``slot_mapping`` (directly or under
``attn_metadata``, as vLLM v0's model inputs have them).

``kv_transfer_config`` fields map onto kvtier's configuration: ``storage_dir`` is
where blocks live (``storage_type="local"``: the disk tier; ``"crail"`` or
``"shared"``: a directory many nodes mount, kvtier's shared tier; ``"kvtier"``: a
node at ``server``); ``enable_ssd_caching`` puts a disk tier at ``ssd_cache_dir`` in
front of it; ``kv_expire_time`` and ``cleanup_interval`` are the store's TTL and sweep;
``enable_prefetch`` promotes a hit's blocks into memory as soon as it is seen.
With ``storage_type="kvtier"``, ``etcd_endpoints`` make the engine a client of a
whole kvtier cluster (``cluster`` names it, default ``"kvtier"``): the nodes are found
through etcd, blocks are placed and replicated across them. Local and shared storage
need no metadata service (the disk tier and the shared directory index themselves), so
there the endpoints go unused. Retrieval always leaves the last prompt token to compute,
so ``bypass_model`` is always False and ``hidden_state`` None.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kvtier.config import Config
from kvtier.core.keys import Namespace, block_keys
from kvtier.errors import ConfigError
from kvtier.integrations._torch import Staging, load_blocks, save_blocks
from kvtier.integrations.backend import Blocks, engine_config, open_backend
from kvtier.integrations.paged import PagedKV
from kvtier.store import TieredStore

if TYPE_CHECKING:
    import torch

__all__ = [
    "KVEngine",
    "ModelInput",
    "RetrieveStatus",
    "StoreStatus",
    "destroy_engine",
    "init_engine",
    "retrieve_kv",
    "should_retrieve",
    "should_store",
    "store_kv",
]

log = logging.getLogger(__name__)


class StoreStatus(enum.Enum):
    """Whether a step's KV is worth storing."""

    STORED = "stored"
    SKIPPED = "skipped"


class RetrieveStatus(enum.Enum):
    """Whether a step's prompt has a stored prefix."""

    HIT = "hit"
    MISS = "miss"


@dataclass
class ModelInput:
    """One engine step's tokens, in the shape the seed's engines pass them.

    Attributes:
        input_tokens: 1-D tensor: the tokens to compute, sequence after sequence.
        seq_lens: Tokens of each sequence in ``input_tokens``.
        slot_mapping: 1-D tensor: the KV slot (``block_id * block_size + offset``)
            of each token of ``input_tokens``.
        prefix_tokens: Per sequence, the tokens before ``input_tokens`` whose KV is
            already in the cache (empty for a fresh prompt; a retrieval moves the
            loaded tokens here).
    """

    input_tokens: torch.Tensor
    seq_lens: list[int]
    slot_mapping: torch.Tensor
    prefix_tokens: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prefix_tokens:
            self.prefix_tokens = [[] for _ in self.seq_lens]

    def spans(self) -> list[tuple[int, int]]:
        """Each sequence's ``[start, stop)`` in ``input_tokens``."""
        starts = [sum(self.seq_lens[:i]) for i in range(len(self.seq_lens))]
        return [(s, s + n) for s, n in zip(starts, self.seq_lens, strict=True)]

    def tokens(self, seq: int) -> list[int]:
        """All tokens of sequence ``seq``: prefix, then input."""
        start, stop = self.spans()[seq]
        return self.prefix_tokens[seq] + self.input_tokens[start:stop].tolist()


def _model_input(obj: Any) -> ModelInput:
    if isinstance(obj, ModelInput):
        return obj
    meta = getattr(obj, "attn_metadata", None)
    source = obj if hasattr(obj, "slot_mapping") else meta
    if source is None or not hasattr(obj, "input_tokens"):
        raise ConfigError(
            "model_input needs input_tokens, seq_lens and slot_mapping "
            f"(directly or under attn_metadata), got {type(obj).__name__}"
        )
    return ModelInput(
        obj.input_tokens.reshape(-1), list(source.seq_lens), source.slot_mapping
    )


def transfer_overrides(transfer: Any) -> tuple[dict[str, Any], list[str]]:
    """kvtier overrides for the seed's ``kv_transfer_config``, and its etcd endpoints
    (part of the overrides with ``storage_type="kvtier"``, unused otherwise).

    Raises:
        ConfigError: An unknown ``storage_type``.
    """
    kind = getattr(transfer, "storage_type", "local")
    storage_dir = str(getattr(transfer, "storage_dir", "./kvtier-data"))
    ssd = bool(getattr(transfer, "enable_ssd_caching", False))
    ssd_dir = str(getattr(transfer, "ssd_cache_dir", "") or f"{storage_dir}/ssd")
    etcd = list(getattr(transfer, "etcd_endpoints", None) or [])
    overrides: dict[str, Any] = {"store.data_dir": storage_dir}
    if kind == "local":
        overrides["disk.path"] = ssd_dir if ssd else f"{storage_dir}/disk"
        if ssd:
            overrides["remote.urls"] = [_file_url(f"{storage_dir}/blocks")]
    elif kind in ("crail", "shared"):
        overrides["remote.urls"] = [_file_url(storage_dir)]
        overrides["disk.enabled"] = ssd
        overrides["disk.path"] = ssd_dir
    elif kind == "kvtier" and etcd:
        overrides["cluster.etcd"] = ",".join(etcd)
        overrides["cluster.name"] = getattr(transfer, "cluster", None) or "kvtier"
    elif kind == "kvtier":
        overrides["engine.server"] = getattr(transfer, "server", "127.0.0.1:7480")
    else:
        raise ConfigError(
            "kv_transfer_config.storage_type must be one of ['local', 'crail', "
            f"'shared', 'kvtier'], got {kind!r}"
        )
    for name, key in (
        ("kv_expire_time", "store.kv_expire_time"),
        ("cleanup_interval", "store.cleanup_interval"),
        ("block_tokens", "store.block_tokens"),
    ):
        if getattr(transfer, name, None) is not None:
            overrides[key] = getattr(transfer, name)
    overrides.update(getattr(transfer, "kvtier", None) or {})
    return overrides, etcd


def _file_url(directory: str) -> str:
    return "file://" + os.path.abspath(directory)


class KVEngine:
    """The engine behind the module functions; one per process via init_engine.

    Args:
        config: An object with ``kv_transfer_config`` (the seed's fields).
    """

    def __init__(self, config: Any) -> None:
        transfer = config.kv_transfer_config
        overrides, self.etcd_endpoints = transfer_overrides(transfer)
        if self.etcd_endpoints and "cluster.etcd" not in overrides:
            log.info(
                "etcd endpoints %s unused: %s storage keeps its own index (they find "
                "a kvtier cluster's nodes with storage_type='kvtier')",
                self.etcd_endpoints,
                getattr(transfer, "storage_type", "local"),
            )
        self.config: Config = engine_config(overrides)
        self.enable_prefetch = bool(getattr(transfer, "enable_prefetch", False))
        self.blocks = Blocks(open_backend(self.config), owned=True)
        self._staging = Staging()
        self._known: Namespace | None = None

    @property
    def block_tokens(self) -> int:
        return self.config.store.block_tokens

    def _namespace(self, paged: PagedKV, model: Any) -> Namespace:
        """The keys' namespace; remembered for :meth:`should_retrieve`."""
        self._known = Namespace(
            self.config.engine.model_id or _model_name(model),
            layout_id=paged.block_layout(self.block_tokens).layout_id,
            block_tokens=self.block_tokens,
            tenant=self.config.engine.tenant,
        )
        return self._known

    def _paged(self, kv_caches: Sequence[torch.Tensor]) -> PagedKV:
        shape = kv_caches[0].shape
        if len(shape) != 5 or shape[0] != 2:
            raise ConfigError(
                "kv_caches must be per-layer tensors of shape (2, num_blocks, "
                f"block_size, num_kv_heads, head_size), got {tuple(shape)}"
            )
        return PagedKV(
            kv_caches,
            num_kv_heads=shape[3],
            head_size=shape[4],
            block_size=shape[2],
            prefer=("kv_first",),
        )

    def should_store(self, model_input: Any) -> StoreStatus:
        """STORED when some sequence completes a whole block in this step."""
        step = _model_input(model_input)
        for seq, (start, stop) in enumerate(step.spans()):
            done = len(step.prefix_tokens[seq])
            if (done + stop - start) // self.block_tokens > -(
                -done // self.block_tokens
            ):
                return StoreStatus.STORED
        return StoreStatus.SKIPPED

    def store_kv(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Sequence[torch.Tensor],
    ) -> int:
        """Stores every whole block this step computed; returns blocks stored."""
        step = _model_input(model_input)
        paged = self._paged(kv_caches)
        namespace = self._namespace(paged, model_executable)
        layout = paged.block_layout(self.block_tokens)
        stored = 0
        for seq, (start, _stop) in enumerate(step.spans()):
            done = len(step.prefix_tokens[seq])
            first = -(-done // self.block_tokens)
            keys = block_keys(namespace, step.tokens(seq))[first:]
            if not keys:
                continue
            skip = first * self.block_tokens - done
            slots = step.slot_mapping[
                start + skip : start + skip + len(keys) * self.block_tokens
            ]
            data = paged.gather(slots, self.block_tokens)
            stored += save_blocks(self.blocks, list(keys), data, layout, self._staging)
        return stored

    def should_retrieve(self, model_input: Any) -> RetrieveStatus:
        """HIT when a fresh prompt's first whole block is stored.

        The keys depend on the KV layout, which the engine learns from the first
        ``kv_caches`` it is handed; until then a prompt with a whole block is a
        HIT to try, and :meth:`retrieve_kv` finds out.
        """
        step = _model_input(model_input)
        for seq, (start, stop) in enumerate(step.spans()):
            if step.prefix_tokens[seq] or stop - start <= self.block_tokens:
                continue
            if self._known is None:
                return RetrieveStatus.HIT
            keys = block_keys(self._known, step.tokens(seq))
            if self.blocks.match(keys[:1]):
                self._prefetch(keys)
                return RetrieveStatus.HIT
        return RetrieveStatus.MISS

    def _prefetch(self, keys: Any) -> None:
        if self.enable_prefetch and isinstance(self.blocks.backend, TieredStore):
            self.blocks.backend.prefetch(keys)  # promotion runs in the background

    def retrieve_kv(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Sequence[torch.Tensor],
    ) -> ModelInput:
        """Loads each fresh prompt's stored prefix into its slots.

        Returns:
            The step without the loaded tokens (moved to ``prefix_tokens``). Whole
            blocks only, and never a prompt's last token.
        """
        step = _model_input(model_input)
        paged = self._paged(kv_caches)
        namespace = self._namespace(paged, model_executable)
        layout = paged.block_layout(self.block_tokens)
        loaded = [0] * len(step.seq_lens)
        for seq, (start, stop) in enumerate(step.spans()):
            if step.prefix_tokens[seq]:
                continue
            keys = block_keys(namespace, step.tokens(seq))
            usable = min(
                self.blocks.match(keys), (stop - start - 1) // self.block_tokens
            )
            if usable == 0:
                continue
            data = load_blocks(self.blocks, list(keys[:usable]), layout, paged.device)
            loaded[seq] = data.shape[0] * self.block_tokens
            paged.scatter(data, step.slot_mapping[start : start + loaded[seq]])
        return _without_loaded(step, loaded)

    def close(self) -> None:
        self.blocks.close()


def _without_loaded(step: ModelInput, loaded: list[int]) -> ModelInput:
    import torch

    keep_tokens, keep_slots, prefixes = [], [], []
    for seq, (start, stop) in enumerate(step.spans()):
        cut = start + loaded[seq]
        keep_tokens.append(step.input_tokens[cut:stop])
        keep_slots.append(step.slot_mapping[cut:stop])
        prefixes.append(step.prefix_tokens[seq] + step.input_tokens[start:cut].tolist())
    return replace(
        step,
        input_tokens=torch.cat(keep_tokens),
        seq_lens=[n - k for n, k in zip(step.seq_lens, loaded, strict=True)],
        slot_mapping=torch.cat(keep_slots),
        prefix_tokens=prefixes,
    )


def _model_name(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or type(model).__name__)


# ------------------------------------------------------------ the module API

_engine: KVEngine | None = None


def init_engine(config: Any) -> KVEngine:
    """Starts the process's engine from ``config.kv_transfer_config``.

    Raises:
        ConfigError: A field has a value kvtier does not allow.
    """
    global _engine
    if _engine is not None:
        _engine.close()
    _engine = KVEngine(config)
    return _engine


def _current() -> KVEngine:
    if _engine is None:
        raise ConfigError("call init_engine(config) first")
    return _engine


def destroy_engine() -> None:
    """Flushes and closes the engine (idempotent)."""
    global _engine
    if _engine is not None:
        _engine.close()
        _engine = None


def should_store(model_input: Any) -> StoreStatus:
    """Whether this step completes a whole block worth storing."""
    return _current().should_store(model_input)


def store_kv(
    model_config: Any,
    parallel_config: Any,
    transfer_config: Any,
    model_executable: Any,
    model_input: Any,
    kv_caches: Sequence[torch.Tensor],
    store_status: StoreStatus,
) -> None:
    """Stores the step's whole blocks (the configs are accepted for the seed's
    signature; kvtier's configuration came with :func:`init_engine`)."""
    if store_status == StoreStatus.STORED:
        _current().store_kv(model_executable, model_input, kv_caches)


def should_retrieve(model_input: Any) -> RetrieveStatus:
    """Whether the step's prompts have a stored prefix."""
    return _current().should_retrieve(model_input)


def retrieve_kv(
    model_executable: Any,
    model_input: Any,
    kv_caches: Sequence[torch.Tensor],
    retrieve_status: RetrieveStatus,
) -> tuple[None, bool, Any]:
    """Loads stored prefixes into ``kv_caches``.

    Returns:
        ``(hidden_state, bypass_model, new_input)``: always ``None`` and ``False``
        (the last token is computed), and the input without the loaded tokens.
    """
    if retrieve_status != RetrieveStatus.HIT:
        return None, False, model_input
    return None, False, _current().retrieve_kv(model_executable, model_input, kv_caches)
