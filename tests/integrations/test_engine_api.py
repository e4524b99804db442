"""The engine API of seed 000: store, then retrieve into a fresh paged cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kvetcd import etcd_cluster
from kvhelpers import BLOCK_TOKENS, tiny_model
from kvnode import start_node, wait_until

from kvtier.errors import ConfigError
from kvtier.integrations import engine_api
from kvtier.integrations.engine_api import (
    ModelInput,
    RetrieveStatus,
    StoreStatus,
    transfer_overrides,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

PAGE, NUM_PAGES = 8, 40


def seed_config(storage_dir: Path, **fields: Any) -> SimpleNamespace:
    transfer = SimpleNamespace(
        storage_type="local",
        storage_dir=str(storage_dir),
        etcd_endpoints=["127.0.0.1:2379"],
        enable_ssd_caching=False,
        ssd_cache_dir=str(storage_dir / "ssd"),
        enable_prefetch=True,
        kv_expire_time=86400,
        cleanup_interval=3600,
        block_tokens=BLOCK_TOKENS,
        kvtier={"memory.capacity_bytes": "64MiB"},
    )
    for name, value in fields.items():
        setattr(transfer, name, value)
    return SimpleNamespace(kv_transfer_config=transfer)


def paged_cache(model: Any) -> list[Any]:
    """Empty vLLM-v0-style pages: (2, pages, page tokens, kv heads, head dim)."""
    cfg = model.config
    shape = (2, NUM_PAGES, PAGE, cfg.num_key_value_heads, cfg.hidden_size // 4)
    return [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]


def write_pages(pages: list[Any], past: Any, slots: Any) -> None:
    """What an engine's attention does: each token's K and V into its slot."""
    for layer, cache_layer in zip(pages, past.layers, strict=True):
        for part, tensor in enumerate((cache_layer.keys, cache_layer.values)):
            tokens = tensor[0].transpose(0, 1)  # tokens, heads, head dim
            layer[part].view(-1, *layer.shape[3:])[slots] = tokens


def read_pages(pages: list[Any], slots: Any) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer_id, layer in enumerate(pages):
        kv = [layer[p].view(-1, *layer.shape[3:])[slots] for p in (0, 1)]
        cache.update(*(t.transpose(0, 1).unsqueeze(0) for t in kv), layer_id)
    return cache


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    yield engine_api.init_engine(seed_config(tmp_path / "kv"))
    engine_api.destroy_engine()


@torch.no_grad()
def test_store_then_retrieve_gives_the_same_kv_and_next_token(engine: Any) -> None:
    assert_round_trip(engine)


def assert_round_trip(engine: Any, *, store: bool = True) -> None:
    """Stores a 70-token prompt's KV (unless ``store`` is False: an earlier engine
    did), retrieves it into other pages and checks the KV and the next token."""
    model = tiny_model("llama")
    ids = torch.randint(0, 1000, (70,), generator=torch.Generator().manual_seed(3))
    full = model(ids[None], use_cache=True)
    pages = paged_cache(model)
    slots = torch.randperm(NUM_PAGES * PAGE)[:70]  # pages scattered anywhere
    write_pages(pages, full.past_key_values, slots)
    step = ModelInput(ids, [70], slots)
    if store:
        assert engine_api.should_store(step) == StoreStatus.STORED
        engine_api.store_kv(None, None, None, model, step, pages, StoreStatus.STORED)

    fresh = paged_cache(model)
    other_slots = torch.randperm(NUM_PAGES * PAGE)[:70]
    step = ModelInput(ids, [70], other_slots)
    assert engine_api.should_retrieve(step) == RetrieveStatus.HIT
    hidden, bypass, rest = engine_api.retrieve_kv(
        model, step, fresh, RetrieveStatus.HIT
    )
    assert hidden is None and bypass is False
    assert rest.seq_lens == [70 - 64] and rest.prefix_tokens[0] == ids[:64].tolist()
    for old, new in zip(pages, fresh, strict=True):
        flat_old = old.view(2, -1, *old.shape[3:])[:, slots[:64]]
        flat_new = new.view(2, -1, *new.shape[3:])[:, other_slots[:64]]
        assert torch.equal(flat_old, flat_new)
    cache = read_pages(fresh, other_slots[:64])
    out = model(rest.input_tokens[None], past_key_values=cache, use_cache=True)
    assert torch.allclose(out.logits[0, -1], full.logits[0, -1], atol=1e-5, rtol=0)
    assert out.logits[0, -1].argmax() == full.logits[0, -1].argmax()


def test_a_short_or_unknown_prompt_is_a_miss(engine: Any) -> None:
    model = tiny_model("llama")
    pages = paged_cache(model)
    short = ModelInput(torch.arange(10), [10], torch.arange(10))
    assert engine_api.should_store(short) == StoreStatus.SKIPPED
    assert engine_api.should_retrieve(short) == RetrieveStatus.MISS
    unknown = ModelInput(torch.arange(40), [40], torch.arange(40))
    _, _, same = engine_api.retrieve_kv(model, unknown, pages, RetrieveStatus.HIT)
    assert same.seq_lens == [40]
    assert engine_api.should_retrieve(unknown) == RetrieveStatus.MISS


@torch.no_grad()
def test_a_shared_directory_serves_a_second_engine(tmp_path: Path) -> None:
    """storage_type="shared": what one engine stored, the next one (empty memory, no
    disk tier) retrieves from the shared directory."""
    shared = tmp_path / "shared"
    first = engine_api.init_engine(seed_config(shared, storage_type="shared"))
    try:
        assert_round_trip(first)
    finally:
        engine_api.destroy_engine()
    second = engine_api.init_engine(seed_config(shared, storage_type="shared"))
    try:
        assert_round_trip(second, store=False)
    finally:
        engine_api.destroy_engine()


@torch.no_grad()
def test_etcd_endpoints_make_the_engine_a_cluster_client(tmp_path: Path) -> None:
    """storage_type="kvtier" with etcd_endpoints: a real etcd, two kvtier nodes of
    one cluster; the engine finds them through etcd and its blocks land on them."""
    with etcd_cluster(tmp_path / "etcd", size=1) as etcd:
        nodes = []
        try:
            for i in range(2):
                (tmp_path / f"n{i}").mkdir()
                nodes.append(
                    start_node(
                        tmp_path / f"n{i}",
                        "cluster.name=engines",
                        f"cluster.etcd={','.join(etcd.endpoints)}",
                        f"server.node_id=n{i}",
                    )
                )
            config = seed_config(
                tmp_path / "kv",
                storage_type="kvtier",
                cluster="engines",
                etcd_endpoints=etcd.endpoints,
                kvtier={},
            )
            engine = engine_api.init_engine(config)
            try:
                wait_until(lambda: len(engine.blocks.backend.nodes) == 2, 30, "nodes")
                assert_round_trip(engine)
            finally:
                engine_api.destroy_engine()
            stored = []
            for node in nodes:
                with node.client(shared_memory=False) as client:
                    stored.append(client.stats()["stats"]["put_blocks"])
            # 64 of the 70 tokens are 4 whole blocks; 2 replicas on 2 nodes: both
            assert stored == [4, 4]
        finally:
            for node in nodes:
                node.stop()


def test_transfer_config_fields_map_to_tiers(tmp_path: Path) -> None:
    local, etcd = transfer_overrides(seed_config(tmp_path).kv_transfer_config)
    assert local["disk.path"] == f"{tmp_path}/disk" and etcd == ["127.0.0.1:2379"]
    assert local["store.kv_expire_time"] == 86400
    shared, _ = transfer_overrides(
        seed_config(
            tmp_path, storage_type="crail", enable_ssd_caching=True
        ).kv_transfer_config
    )
    assert shared["remote.urls"] == [f"file://{tmp_path}"]
    assert shared["disk.enabled"] is True
    assert "cluster.name" not in local and "cluster.name" not in shared
    clustered, _ = transfer_overrides(
        seed_config(tmp_path, storage_type="kvtier", cluster="prod").kv_transfer_config
    )
    assert clustered["cluster.etcd"] == "127.0.0.1:2379"
    assert clustered["cluster.name"] == "prod" and "engine.server" not in clustered
    with pytest.raises(ConfigError, match="storage_type"):
        transfer_overrides(seed_config(tmp_path, storage_type="nfs").kv_transfer_config)


def test_calls_before_init_name_init_engine() -> None:
    with pytest.raises(ConfigError, match="init_engine"):
        engine_api.should_store(ModelInput(torch.arange(4), [4], torch.arange(4)))
