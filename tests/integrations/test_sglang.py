"""The SGLang HiCache storage backend against a live node."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from kvnode import NodeProcess

from kvtier.integrations.sglang import KVTierHiCacheStorage

torch = pytest.importorskip("torch")


def storage_config(node: NodeProcess, **fields: Any) -> SimpleNamespace:
    """What SGLang passes: ranks, the model, and the extra config."""
    return SimpleNamespace(
        tp_rank=0,
        tp_size=2,
        pp_rank=0,
        pp_size=1,
        is_mla_model=False,
        model_name=f"model-{uuid.uuid4().hex}",
        extra_config={
            "backend_name": "kvtier",
            "module_path": "kvtier.integrations.sglang",
            "class_name": "KVTierHiCacheStorage",
            "server": node.address,
        },
        **fields,
    )


@pytest.fixture
def backend(node: NodeProcess) -> Any:
    storage = KVTierHiCacheStorage(storage_config(node), {})
    yield storage
    storage.close()


def pages(count: int) -> list[Any]:
    return [torch.randn(2, 4, 64, dtype=torch.bfloat16) for _ in range(count)]


def test_round_trip_into_host_pages(backend: KVTierHiCacheStorage) -> None:
    keys, values = [f"page-{i}" for i in range(4)], pages(4)
    assert backend.batch_set(keys, values)
    assert backend.set("single", values[0])
    targets = [torch.empty_like(v) for v in values]
    got = backend.batch_get(keys, targets)
    assert all(g is t for g, t in zip(got, targets, strict=True))
    assert all(torch.equal(t, v) for t, v in zip(targets, values, strict=True))
    raw = backend.get("single")
    assert torch.equal(raw.view(torch.bfloat16).view(2, 4, 64), values[0])
    assert backend.get("never-stored", torch.empty_like(values[0])) is None


def test_batch_exists_counts_the_leading_run(backend: KVTierHiCacheStorage) -> None:
    keys = [f"run-{i}" for i in range(6)]
    backend.batch_set(keys[:3] + keys[4:5], pages(4))
    assert backend.batch_exists(keys) == 3
    assert backend.exists("run-4") and not backend.exists("run-3")


def test_ranks_and_models_do_not_share_pages(node: NodeProcess) -> None:
    config = storage_config(node)
    rank0 = KVTierHiCacheStorage(config, {})
    rank1 = KVTierHiCacheStorage(SimpleNamespace(**{**vars(config), "tp_rank": 1}), {})
    mla = KVTierHiCacheStorage(
        SimpleNamespace(**{**vars(config), "is_mla_model": True, "tp_rank": 1}), {}
    )
    assert rank0.set("shared-key", pages(1)[0])
    assert rank0.exists("shared-key") and not rank1.exists("shared-key")
    assert mla.set("mla-key", pages(1)[0])
    mla0 = KVTierHiCacheStorage(
        SimpleNamespace(**{**vars(config), "is_mla_model": True}), {}
    )
    assert mla0.exists("mla-key")  # MLA pages are the same on every rank
    for storage in (rank0, rank1, mla, mla0):
        storage.close()


def test_a_dead_node_degrades_to_misses(backend: KVTierHiCacheStorage) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            from kvtier.errors import ConnectionLostError

            def fail(*args: Any, **kwargs: Any) -> Any:
                raise ConnectionLostError("node gone")

            return fail

    real, backend.backend = backend.backend, Broken()  # type: ignore[assignment]
    try:
        assert backend.batch_exists(["a"]) == 0
        assert backend.set("a", pages(1)[0]) is False
        assert backend.get("a", torch.empty(1)) is None
    finally:
        backend.backend = real


@pytest.mark.vllm
def test_sglang_loads_it_as_a_dynamic_backend(node: NodeProcess) -> None:
    """With SGLang installed (the engine CI step): its own factory builds it."""
    factory = pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory")
    from sglang.srt.mem_cache.hicache_storage import (
        HiCacheStorage,
        HiCacheStorageConfig,
    )

    assert issubclass(KVTierHiCacheStorage, HiCacheStorage)
    config = HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=True,
        model_name="m",
        extra_config=storage_config(node).extra_config,
    )
    storage = factory.StorageBackendFactory.create_backend("dynamic", config, None)
    try:
        assert isinstance(storage, KVTierHiCacheStorage)
        assert storage.batch_set(["k"], pages(1)) and storage.batch_exists(["k"]) == 1
    finally:
        storage.close()
