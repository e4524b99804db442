"""transformers: a DynamicCache saved and loaded by prefix, in a store or a node."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from kvhelpers import BLOCK_TOKENS, store_settings, tiny_model
from kvnode import NodeProcess

import kvtier
from kvtier.core.keys import BlockKey
from kvtier.errors import LayoutError
from kvtier.integrations.transformers import PrefixCache
from kvtier.store import TieredStore

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

KINDS = ["llama", "qwen2"]


def prompt(num_tokens: int, seed: int = 1) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (1, num_tokens), generator=generator)


def settings(store: TieredStore) -> dict[str, Any]:
    return {"store.block_tokens": BLOCK_TOKENS}


@pytest.fixture(params=KINDS)
def model(request: pytest.FixtureRequest) -> Any:
    return tiny_model(request.param)


@torch.no_grad()
def test_logits_agree_with_and_without_kvtier(model: Any, store: TieredStore) -> None:
    ids = prompt(100)
    full = model(ids, use_cache=True)
    kv = PrefixCache(model, store, config=settings(store))
    assert kv.save(ids, full.past_key_values) == 100 // BLOCK_TOKENS
    loaded = kv.load(ids)
    assert loaded.num_tokens == 96
    rest = model(ids[:, 96:], past_key_values=loaded.cache, use_cache=True)
    assert torch.allclose(rest.logits, full.logits[:, 96:], atol=1e-5, rtol=0)


@torch.no_grad()
def test_greedy_generation_is_identical_and_skips_the_stored_prefix(
    model: Any, store: TieredStore
) -> None:
    ids = prompt(80)
    plain = model.generate(ids, max_new_tokens=12, do_sample=False)
    kv = PrefixCache(model, store, config=settings(store))
    first = kv.generate(ids, max_new_tokens=12, do_sample=False)
    second = kv.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(plain, first) and torch.equal(plain, second)
    # the first call stored prompt + output blocks; the second loaded all but one
    # token of the prompt (80 tokens: five whole blocks, the last one cropped)
    assert kv.stats.loaded_tokens == 79
    assert kv.stats.hit_ratio == pytest.approx(79 / 160)


@torch.no_grad()
def test_a_partial_hit_loads_the_shared_prefix_only(store: TieredStore) -> None:
    model = tiny_model("llama")
    kv = PrefixCache(model, store, config=settings(store))
    shared = prompt(48)
    first = torch.cat([shared, prompt(40, seed=2)], dim=1)
    kv.save(first, model(first, use_cache=True).past_key_values)
    second = torch.cat([shared, prompt(40, seed=3)], dim=1)
    assert kv.lookup(second) == 48
    loaded = kv.load(second)
    assert loaded.num_tokens == 48
    full = model(second, use_cache=True)
    rest = model(second[:, 48:], past_key_values=loaded.cache, use_cache=True)
    assert torch.allclose(rest.logits, full.logits[:, 48:], atol=1e-5, rtol=0)


class EvictsAfterMatch:
    """A real store that loses blocks right after a match answers (fault injection)."""

    def __init__(self, store: TieredStore, keep: int) -> None:
        self.store = store
        self.keep = keep

    def match(self, keys: Sequence[BlockKey], **kwargs: Any) -> Any:
        result = self.store.match(keys, **kwargs)
        self.store.delete(list(keys)[self.keep :])
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@torch.no_grad()
def test_a_block_evicted_between_match_and_load_falls_back_to_compute(
    store: TieredStore,
) -> None:
    model = tiny_model("qwen2")
    ids = prompt(90)
    full = model(ids, use_cache=True)
    PrefixCache(model, store, config=settings(store)).save(ids, full.past_key_values)
    kv = PrefixCache(model, EvictsAfterMatch(store, keep=2), config=settings(store))
    loaded = kv.load(ids)
    assert loaded.num_tokens == 2 * BLOCK_TOKENS  # match said 5, two were left
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    cached = model.generate(
        ids, past_key_values=loaded.cache, max_new_tokens=6, do_sample=False
    )
    assert torch.equal(plain, cached)


@torch.no_grad()
@pytest.mark.parametrize("path", ["shared_memory", "tcp"])
def test_works_against_a_node(node: NodeProcess, path: str) -> None:
    model = tiny_model("llama", seed=7)
    ids = prompt(70, seed=11)
    with node.client(shared_memory=path == "shared_memory") as client:
        kv = PrefixCache(
            model,
            client,
            config=settings(None),
            model_id=f"node-{path}",  # type: ignore[arg-type]
        )
        plain = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(kv.generate(ids, max_new_tokens=5, do_sample=False), plain)
        assert torch.equal(kv.generate(ids, max_new_tokens=5, do_sample=False), plain)
        assert kv.stats.loaded_tokens == 64


def test_batches_are_refused(store: TieredStore) -> None:
    model = tiny_model("llama")
    kv = PrefixCache(model, store, config=settings(store))
    with pytest.raises(LayoutError, match="batch of 2"):
        kv.generate(prompt(40).repeat(2, 1), max_new_tokens=1)


def test_an_owned_store_opens_from_config(tmp_path: Any) -> None:
    model = tiny_model("llama")
    ids = prompt(40)
    with PrefixCache(model, config=store_settings(tmp_path / "own")) as kv:
        kv.generate(ids, max_new_tokens=2, do_sample=False)
    with kvtier.open(overrides=store_settings(tmp_path / "own")) as reopened:
        assert (
            reopened.match(
                PrefixCache(model, reopened, config=settings(reopened)).keys(ids)
            ).num_blocks
            == 2
        )


@torch.no_grad()
@pytest.mark.parametrize("hint", [False, True])
def test_a_finished_conversation_goes_first(tmp_path: Any, hint: bool) -> None:
    """finish() reaches the eviction policy: with it, a conversation that is over
    gives way before an older one that may go on."""
    model = tiny_model("llama")
    overrides = store_settings(
        tmp_path / "kv",
        **{
            "memory.capacity_bytes": "128KiB",  # 16 blocks of 8 KiB
            "memory.slab_bytes": "32KiB",
            "disk.enabled": False,
        },
    )
    with kvtier.open(overrides=overrides) as store:
        kv = PrefixCache(model, store, config=settings(store))
        assert kv.layout.block_bytes == 8192
        older, over = prompt(64, seed=1), prompt(64, seed=2)  # 4 blocks each
        for ids in (older, over):
            assert kv.save(ids, model(ids, use_cache=True).past_key_values) == 4
        if hint:
            kv.finish(over)
        filler = prompt(128, seed=3)  # 8 more blocks: over the high watermark
        assert kv.save(filler, model(filler, use_cache=True).past_key_values) == 8
        kept = tuple(store.match(kv.keys(ids)).num_blocks for ids in (older, over))
    # Oldest first without the hint; the finished conversation first with it.
    assert kept == ((4, 0) if hint else (0, 4)), kept
