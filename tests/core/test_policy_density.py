"""HitDensityPolicy: leaf first, learned classes over recency, ghosts, vetoes."""

from __future__ import annotations

import pytest
from test_policy import drain, k, names, veto

from kvtier.core.policy import HitDensityPolicy, make_policy
from kvtier.errors import ConfigError


def test_before_learning_it_is_leaf_first_lru() -> None:
    policy = HitDensityPolicy()
    policy.insert(k("a"), 1, None, 0.0)
    policy.insert(k("b"), 1, k("a"), 0.0)
    policy.insert(k("c"), 1, k("b"), 0.0)
    policy.insert(k("d"), 1, None, 1.0)
    # Leaves c and d; their ages (100 s, 99 s) share a bucket, so the older access
    # goes first; each parent then becomes a leaf at its own (older) access.
    assert drain(policy, 100.0) == ["c", "b", "a", "d"]


def trained() -> HitDensityPolicy:
    """Blocks on their second access always came back 10 s later; new ones half did."""
    policy = HitDensityPolicy(refresh_accesses=32, decay=1.0)
    now = 0.0
    for i in range(16):
        policy.insert(k(f"x{i}"), 1, None, now)
        policy.insert(k(f"y{i}"), 1, None, now)
        policy.touch(k(f"x{i}"), now + 10)
        policy.touch(k(f"x{i}"), now + 20)
        now += 30
    while policy.evict(now) is not None:
        pass
    return policy


def test_learned_class_outranks_recency() -> None:
    policy = trained()
    policy.insert(k("a"), 1, None, 1000.0)
    policy.touch(k("a"), 1010.0)  # second access: the class that always came back
    policy.insert(k("b"), 1, None, 1015.0)  # newer, but of the class that half did
    assert policy.density(k("a"), 1015.0) > policy.density(k("b"), 1015.0)
    assert drain(policy, 1015.0) == ["b", "a"]


def test_a_continuation_inherits_its_conversation_count() -> None:
    policy = trained()
    policy.insert(k("turn1"), 1, None, 1000.0)
    policy.touch(k("turn1"), 1010.0)
    # The next turn's new block continues turn1's chain: it counts as a second access.
    policy.insert(k("turn2"), 1, k("turn1"), 1010.0)
    policy.insert(k("fresh"), 1, None, 1010.0)
    assert policy.density(k("turn2"), 1015.0) == policy.density(k("turn1"), 1015.0)
    assert policy.density(k("turn2"), 1015.0) > policy.density(k("fresh"), 1015.0)


def test_under_a_shared_prefix_a_chain_starts_its_own_count() -> None:
    policy = trained()
    policy.insert(k("system"), 1, None, 1000.0)
    for user in ("u1", "u2", "u3"):
        policy.touch(k("system"), 1000.0)
        policy.insert(k(user), 1, k("system"), 1000.0)
    # u1 and u2 continued system's chain while it had at most one child; u3 did not.
    assert policy.density(k("u3"), 1005.0) < policy.density(k("u1"), 1005.0)


def test_a_block_stored_again_gets_its_count_back() -> None:
    policy = trained()
    policy.insert(k("x"), 1, None, 1000.0)
    assert policy.evict(1000.0) == k("x")
    policy.insert(k("x"), 1, None, 1005.0)  # back from the ghost: a second access
    policy.insert(k("y"), 1, None, 1005.0)  # a first access
    assert policy.density(k("x"), 1010.0) > policy.density(k("y"), 1010.0)


def test_evicted_keys_are_remembered_until_they_return() -> None:
    policy = HitDensityPolicy()
    policy.insert(k("a"), 1, None, 0.0)
    policy.insert(k("b"), 1, None, 1.0)
    assert policy.evict(2.0) == k("a")
    assert policy.in_ghost(k("a")) and not policy.in_ghost(k("b"))
    policy.insert(k("a"), 1, None, 3.0)
    assert not policy.in_ghost(k("a")) and k("a") in policy
    policy.remove(k("b"))
    assert not policy.in_ghost(k("b"))  # a removal is not an eviction


def test_a_reinsert_naming_a_parent_links_it() -> None:
    policy = HitDensityPolicy()
    policy.insert(k("p"), 1, None, 0.0)
    policy.insert(k("c"), 1, None, 1.0)  # parent unknown at first
    policy.insert(k("c"), 1, k("p"), 2.0)  # now named: p is no leaf any more
    assert drain(policy, 10.0) == ["c", "p"]


def test_vetoed_leaf_keeps_its_place_and_parent_waits() -> None:
    policy = HitDensityPolicy()
    policy.insert(k("a"), 1, None, 0.0)
    policy.insert(k("b"), 1, k("a"), 0.0)
    policy.insert(k("c"), 1, None, 1.0)
    assert policy.evict(10.0, veto("b")) == k("c")  # a has a child, b is leased
    assert policy.evict(10.0, veto("b")) is None
    assert names(policy.evict_bytes(5, 10.0)) == ["b", "a"]


def test_many_touches_keep_the_heaps_bounded() -> None:
    policy = HitDensityPolicy()
    for key in "abc":
        policy.insert(k(key), 1, None, 0.0)
    for step in range(2000):
        policy.touch(k("abc"[step % 3]), float(step))
    assert policy._num_heap_items <= 6 * len(policy) + HitDensityPolicy._HEAP_SLACK + 2
    assert sorted(drain(policy, 3000.0)) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_classes", 0), ("refresh_accesses", 0), ("decay", 0.0), ("decay", 1.5),
     ("horizon_scale", 0.0)],
)  # fmt: skip
def test_bad_options_are_named(option: str, value: float) -> None:
    with pytest.raises(ConfigError, match=option):
        make_policy("hit_density", **{option: value})


# ------------------------------------------------------------------ finish hints


def test_a_finished_conversation_goes_first_even_before_learning() -> None:
    policy = HitDensityPolicy()
    policy.insert(k("old"), 1, None, 0.0)  # oldest: leaf-first LRU's next victim
    policy.insert(k("a"), 1, None, 1.0)
    policy.insert(k("b"), 1, k("a"), 1.0)
    policy.finish([k("a"), k("b")], 2.0)
    assert drain(policy, 10.0) == ["b", "a", "old"]


def test_finish_stops_at_a_prefix_other_prompts_go_on_from() -> None:
    policy = HitDensityPolicy()
    policy.insert(k("system"), 1, None, 0.0)
    policy.insert(k("x"), 1, k("system"), 1.0)
    policy.insert(k("x2"), 1, k("x"), 1.0)
    policy.insert(k("y"), 1, k("system"), 2.0)
    policy.finish([k("system"), k("x"), k("x2")], 3.0)
    finished = [
        name
        for name in ("system", "x", "x2", "y")
        if policy.density(k(name), 3.0) < -1e11
    ]
    assert finished == ["x", "x2"]  # system has two children: shared, kept out


def test_a_finished_block_used_again_is_finished_no_more() -> None:
    policy = HitDensityPolicy()
    policy.insert(k("a"), 1, None, 0.0)
    policy.insert(k("b"), 1, None, 1.0)
    policy.finish([k("a")], 2.0)
    assert policy.density(k("a"), 2.0) < -1e11
    policy.touch(k("a"), 3.0)  # the conversation came back after all
    assert policy.density(k("a"), 3.0) > -1e11
    assert drain(policy, 10.0) == ["b", "a"]


def test_finished_blocks_learn_their_own_density() -> None:
    """Finished blocks that never come back learn a density of zero; a class that
    does come back ranks above them once learned."""
    policy = HitDensityPolicy(refresh_accesses=16, decay=1.0)
    now = 0.0
    for i in range(32):
        policy.insert(k(f"done{i}"), 1, None, now)
        policy.finish([k(f"done{i}")], now)
        policy.insert(k(f"live{i}"), 1, None, now)
        policy.touch(k(f"live{i}"), now + 5)
        now += 10
    policy.insert(k("d"), 1, None, now)
    policy.finish([k("d")], now)
    policy.insert(k("l"), 1, None, now)  # new blocks came back 5 s later
    later = now + 3
    assert -1e11 < policy.density(k("d"), later) < policy.density(k("l"), later)


@pytest.mark.parametrize("name", ["lru", "leaf_lru", "lfu", "arc", "s3fifo"])
def test_policies_without_hints_ignore_finish(name: str) -> None:
    def victims(finish: bool) -> list[str]:
        policy = make_policy(name)
        for i, name_ in enumerate("abcd"):
            policy.insert(k(name_), 1, None, float(i))
        if finish:
            policy.finish([k("c"), k("d")], 5.0)
        return drain(policy, 10.0)

    assert victims(True) == victims(False)
