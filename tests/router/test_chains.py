"""Engine blocks -> kvtier keys: chains, partial blocks, branches, media, removal."""

from __future__ import annotations

import random

import pytest
from tests.router import vllm

from kvtier.core.keys import BlockKey, Namespace, block_keys
from kvtier.router.chains import PodChains
from kvtier.router.events import BlockRemoved, BlockStored, EngineHash
from kvtier.router.index import GlobalIndex, SlotSink

BLOCK_TOKENS = 64  # four 16-token engine blocks per kvtier block
GPU, CPU = 1, 2  # holders mask bits of slot 0 (two tiers)


def namespace(lora: str | None = None, salt: str = "") -> Namespace:
    return Namespace(
        "m", block_tokens=BLOCK_TOKENS, lora_id=lora or "", cache_salt=salt
    )


class Pod:
    """One pod's chains over a one-slot index, plus helpers to feed it."""

    def __init__(self, max_blocks: int = 10_000) -> None:
        self.index = GlobalIndex(2)
        self.chains = PodChains(
            SlotSink(self.index, self.index.add_slot()),
            namespace,
            BLOCK_TOKENS,
            {"GPU": 0, "CPU": 1},
            max_blocks,
        )

    def store(
        self,
        tokens: list[int],
        start: int,
        stop: int,
        medium: str | None = "GPU",
        **kwargs: object,
    ) -> list[EngineHash]:
        """Stores engine blocks [start, stop) of the prompt ``tokens``."""
        hashes: list[EngineHash] = [vllm.as_int(h) for h in vllm.engine_hashes(tokens)]
        parent = hashes[start - 1] if start else None
        self.chains.stored(
            BlockStored(
                hashes[start:stop],
                parent,
                tokens[start * 16 : stop * 16],
                16,
                medium,
                **kwargs,  # type: ignore[arg-type]
            )
        )
        return hashes

    def remove(self, hashes: list[EngineHash], medium: str | None = "GPU") -> None:
        self.chains.removed(BlockRemoved(hashes, medium))

    def masks(self, tokens: list[int], ns: Namespace | None = None) -> list[int]:
        return self.index.masks(block_keys(ns or namespace(), tokens))


def prompt(num_tokens: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(128_000) for _ in range(num_tokens)]


@pytest.mark.parametrize("cuts", [[0, 12], [0, 5, 12], [0, 1, 2, 3, 7, 8, 11, 12]])
def test_engine_chains_make_the_routers_own_keys_however_the_events_are_cut(
    cuts: list[int],
) -> None:
    tokens, pod = prompt(12 * 16), Pod()
    for start, stop in zip(cuts, cuts[1:], strict=False):
        pod.store(tokens, start, stop)
    assert pod.masks(tokens) == [GPU, GPU, GPU]
    assert pod.chains.num_blocks == 12 and pod.chains.num_keys == 3


def test_bytes_hashes_work_like_ints() -> None:
    tokens, pod = prompt(8 * 16), Pod()
    hashes = vllm.engine_hashes(tokens)
    pod.chains.stored(BlockStored(list(hashes), None, tokens, 16, None))
    assert pod.masks(tokens) == [GPU, GPU]


def test_a_partial_kvtier_block_is_not_credited() -> None:
    tokens, pod = prompt(7 * 16), Pod()
    pod.store(tokens, 0, 7)
    assert pod.masks(tokens + [1] * 16) == [GPU, 0]
    assert pod.chains.num_keys == 1


def test_a_branch_from_the_middle_of_a_kvtier_block_uses_the_stored_tokens() -> None:
    shared = prompt(6 * 16, seed=1)
    first, second = shared + prompt(2 * 16, seed=2), shared + prompt(2 * 16, seed=3)
    pod = Pod()
    pod.store(first, 0, 8)
    pod.store(second, 6, 8)  # parent is engine block 5: mid-way through key 1
    assert pod.masks(first) == [GPU, GPU]
    assert pod.masks(second) == [GPU, GPU]


def test_removing_any_block_of_a_run_withdraws_its_key_and_only_that_key() -> None:
    tokens, pod = prompt(8 * 16), Pod()
    hashes = pod.store(tokens, 0, 8)
    pod.remove([hashes[1]])
    assert pod.masks(tokens) == [0, GPU]  # the scorer ends the prefix at block 0
    pod.remove([hashes[7]])
    assert pod.masks(tokens) == [0, 0]
    pod.store(tokens, 1, 2)  # back again: its run is whole once more
    assert pod.masks(tokens) == [GPU, 0]


def test_removing_a_shared_block_withdraws_every_branch_through_it() -> None:
    shared = prompt(2 * 16, seed=4)
    a, b = shared + prompt(2 * 16, seed=5), shared + prompt(2 * 16, seed=6)
    pod = Pod()
    hashes = pod.store(a, 0, 4)
    pod.store(b, 2, 4)
    pod.remove([hashes[1]])
    assert pod.masks(a) == [0] and pod.masks(b) == [0]


def test_tier_is_the_worst_block_of_the_run_and_gpu_wins_over_cpu_per_block() -> None:
    tokens, pod = prompt(4 * 16), Pod()
    hashes = pod.store(tokens, 0, 4, medium="GPU")
    pod.store(tokens, 0, 4, medium="CPU")  # offloaded copies
    assert pod.masks(tokens) == [GPU]
    pod.remove([hashes[2]], medium="GPU")  # block 2 now only on CPU
    assert pod.masks(tokens) == [CPU]
    pod.remove([hashes[2]], medium="CPU")
    assert pod.masks(tokens) == [0]
    assert pod.chains.num_blocks == 3


def test_medium_names_are_case_blind_and_unknown_media_are_not_indexed() -> None:
    tokens, pod = prompt(4 * 16), Pod()
    pod.store(tokens, 0, 4, medium="cpu")
    assert pod.masks(tokens) == [CPU]
    pod.store(prompt(4 * 16, seed=9), 0, 4, medium="STORAGE")
    assert pod.chains.stats.ignored == {"medium": 4}


def test_blocks_whose_parent_is_unknown_are_not_indexed() -> None:
    tokens, pod = prompt(8 * 16), Pod()
    pod.store(tokens, 4, 8)
    assert pod.masks(tokens) == [0, 0]
    assert pod.chains.stats.ignored == {"unknown_parent": 4}


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"block_size": 24}, "block_size"),
        ({"token_ids": list(range(10))}, "token_ids"),
        ({"token_ids": [-1] * 32}, "token_ids"),
        ({"group_idx": 1}, "group"),
    ],
)
def test_events_of_the_wrong_shape_are_counted_not_indexed(
    kwargs: dict[str, object], reason: str
) -> None:
    pod = Pod()
    fields: dict[str, object] = {
        "block_hashes": [1, 2],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
    }
    pod.chains.stored(BlockStored(**{**fields, **kwargs}))  # type: ignore[arg-type]
    assert pod.chains.stats.ignored == {reason: 2} and pod.chains.num_blocks == 0


def test_lora_and_cache_salt_key_the_chain_in_their_namespace() -> None:
    tokens, pod = prompt(4 * 16), Pod()
    salt_keys: list[tuple[object, ...] | None] = [
        (("lora", "sql", "/adapters/sql"), ("cache_salt", "u7")),
        (("lora", "sql", "/adapters/sql"),),
        ("sql",),  # untagged LoRA name, as older releases sent it
        None,
    ]
    pod.store(tokens, 0, 4, lora_name="sql", extra_keys=salt_keys)
    assert pod.masks(tokens) == [0]
    assert pod.masks(tokens, namespace("sql", "u7")) == [GPU]


def test_multimodal_blocks_and_their_descendants_are_not_indexed() -> None:
    tokens, pod = prompt(8 * 16), Pod()
    extra: list[tuple[object, ...] | None] = (
        [None] * 5 + [(("mm", "img0", 0),)] + [None] * 2
    )
    pod.store(tokens, 0, 8, extra_keys=extra)
    assert pod.masks(tokens) == [GPU, 0]
    assert pod.chains.stats.ignored == {"extra_keys": 3}
    pod.store(tokens + prompt(4 * 16), 8, 12)
    assert pod.chains.stats.ignored == {"extra_keys": 3, "unknown_parent": 4}


def test_the_least_recently_stored_blocks_go_past_the_bound() -> None:
    pod = Pod(max_blocks=8)
    old, new = prompt(8 * 16, seed=1), prompt(8 * 16, seed=2)
    pod.store(old, 0, 8)
    pod.store(new, 0, 4)
    assert pod.chains.num_blocks == 8 and pod.chains.stats.evicted == 4
    assert pod.masks(old) == [0, GPU] and pod.masks(new) == [GPU, 0]


def test_extending_a_prefix_keeps_its_parent_recent() -> None:
    pod = Pod(max_blocks=8)
    system = prompt(4 * 16, seed=1)
    pod.store(system, 0, 4)
    pod.store(prompt(3 * 16, seed=2), 0, 3)
    pod.store(system + prompt(16, seed=3), 4, 5)  # touches engine block 3
    pod.store(prompt(16, seed=4), 0, 1)  # evicts block 0 of the system prompt...
    assert pod.chains.stats.evicted == 1
    assert pod.masks(system) == [0]


def test_clear_withdraws_everything() -> None:
    tokens, pod = prompt(8 * 16), Pod()
    pod.store(tokens, 0, 8)
    pod.chains.clear()
    assert pod.masks(tokens) == [0, 0] and pod.index.num_keys == 0
    assert pod.chains.num_blocks == 0 and pod.chains.num_keys == 0


def test_closers_removed_leave_no_stale_covers_behind() -> None:
    shared, pod = prompt(2 * 16, seed=1), Pod()
    for seed in range(50):
        branch = shared + prompt(2 * 16, seed=100 + seed)
        hashes = pod.store(branch, 2 if seed else 0, 4)
        pod.remove(hashes[3:4])
    head, middle = (
        pod.chains._blocks[vllm.as_int(h)] for h in vllm.engine_hashes(shared)
    )
    assert head[7] == () and head[6] == middle[6] == 0  # no covers, nothing through


def test_keys_match_across_pods_with_different_engine_hashes() -> None:
    tokens, a, b = prompt(8 * 16), Pod(), Pod()
    a.store(tokens, 0, 8)
    salted = [h ^ 0xFFFF for h in (vllm.as_int(x) for x in vllm.engine_hashes(tokens))]
    b.chains.stored(BlockStored(list(salted), None, tokens, 16, "GPU"))
    keys: list[BlockKey] = list(block_keys(namespace(), tokens))
    assert a.index.masks(keys) == b.index.masks(keys) == [GPU, GPU]


def test_a_medium_change_in_one_branch_leaves_its_sibling_alone() -> None:
    shared = prompt(2 * 16, seed=7)
    a, b = shared + prompt(2 * 16, seed=8), shared + prompt(2 * 16, seed=9)
    pod = Pod()
    hashes = pod.store(a, 0, 4)
    pod.store(b, 2, 4)
    pod.store(a, 0, 4, medium="CPU")
    pod.remove([hashes[2]], medium="GPU")
    assert pod.masks(a) == [CPU] and pod.masks(b) == [GPU]


@pytest.mark.parametrize("order", [1, -1])
def test_the_order_of_hashes_in_one_removal_does_not_matter(order: int) -> None:
    tokens, pod = prompt(8 * 16), Pod()
    hashes = pod.store(tokens, 0, 8)
    pod.remove(hashes[1:8][::order])
    assert pod.masks(tokens) == [0, 0]
    assert pod.chains.num_blocks == 1 and pod.chains.num_keys == 0
    assert len(pod.chains._blocks) == 1  # no tombstones left behind
