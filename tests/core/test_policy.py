"""Eviction policies: exact victim orders, vetoes, byte accounting, the registry."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.core.keys import BlockKey
from kvtier.core.policy import (
    POLICIES,
    CanEvict,
    EvictionPolicy,
    LeafFirstLRUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    WeightedLRUPolicy,
    make_policy,
)
from kvtier.errors import ConfigError

ALL_NAMES = ["lru", "weighted_lru", "leaf_lru", "s3fifo"]


def k(name: str) -> BlockKey:
    return BlockKey(name.encode())


def names(keys: list[BlockKey]) -> list[str]:
    return [key.decode() for key in keys]


def drain(policy: EvictionPolicy, now: float = 100.0) -> list[str]:
    victims: list[str] = []
    while (key := policy.evict(now)) is not None:
        victims.append(key.decode())
    assert len(policy) == 0 and policy.total_bytes == 0
    return victims


def veto(*blocked: str) -> CanEvict:
    blocked_keys = {k(name) for name in blocked}
    return lambda key: key not in blocked_keys


# --- one script, four different orders --------------------------------------------


def run_shared_script(policy: EvictionPolicy) -> None:
    """a (hit twice, never since), b (child of a), c, d; then hits on c and b."""
    policy.insert(k("a"), 10, None, 0.0)
    policy.touch(k("a"), 0.0)
    policy.touch(k("a"), 0.0)
    policy.insert(k("b"), 10, k("a"), 1.0)
    policy.insert(k("c"), 10, None, 2.0)
    policy.insert(k("d"), 10, None, 3.0)
    policy.touch(k("c"), 4.0)
    policy.touch(k("b"), 5.0)


# lru: last accesses a < d < c < b.
# leaf_lru: a is b's parent, so it waits for b: d, c, b, then a.
# weighted_lru: d has no hits and is older than b and c, so goes first; a's two hits
#   (f = log2(3)/4 = 0.40, keep 0.20) keep it until only b and c are left, which both
#   have one hit; c is older.
# s3fifo: all start in small; a, b, c have hits and move to main, d has none and is
#   evicted from small; then main is a plain FIFO of a, b, c (counters reset).
SHARED_ORDERS = {
    "lru": ["a", "d", "c", "b"],
    "leaf_lru": ["d", "c", "b", "a"],
    "weighted_lru": ["d", "a", "c", "b"],
    "s3fifo": ["d", "a", "b", "c"],
}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_shared_script_exact_order(name: str) -> None:
    policy = make_policy(name)
    run_shared_script(policy)
    assert len(policy) == 4 and policy.total_bytes == 40
    assert drain(policy) == SHARED_ORDERS[name]


def test_shared_script_orders_all_differ() -> None:
    orders = {tuple(order) for order in SHARED_ORDERS.values()}
    assert len(orders) == len(ALL_NAMES)


# --- common behaviour --------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_evict_on_empty_returns_none(name: str) -> None:
    policy = make_policy(name)
    assert policy.evict(0.0) is None
    assert policy.evict_bytes(100, 0.0) == []


@pytest.mark.parametrize("name", ALL_NAMES)
def test_absent_keys_are_no_ops(name: str) -> None:
    policy = make_policy(name)
    policy.insert(k("a"), 7, None, 0.0)
    policy.touch(k("zz"), 1.0)
    policy.remove(k("zz"))
    assert len(policy) == 1 and policy.total_bytes == 7
    assert k("a") in policy and k("zz") not in policy and "a" not in policy


@pytest.mark.parametrize("name", ALL_NAMES)
def test_reinsert_updates_size_without_duplicating(name: str) -> None:
    policy = make_policy(name)
    policy.insert(k("a"), 10, None, 0.0)
    policy.insert(k("a"), 25, None, 1.0)
    assert len(policy) == 1 and policy.total_bytes == 25
    assert drain(policy) == ["a"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_negative_size_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="nbytes"):
        make_policy(name).insert(k("a"), -1, None, 0.0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_all_vetoed_returns_none_and_keeps_every_key(name: str) -> None:
    policy = make_policy(name)
    for i, key in enumerate("abcd"):
        policy.insert(k(key), 10, None, float(i))
    policy.touch(k("b"), 5.0)
    policy.touch(k("b"), 6.0)
    assert policy.evict(7.0, lambda key: False) is None
    assert policy.evict_bytes(40, 7.0, lambda key: False) == []
    assert len(policy) == 4 and policy.total_bytes == 40
    assert sorted(drain(policy)) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_evict_bytes_frees_enough_and_stops(name: str) -> None:
    policy = make_policy(name)
    sizes = {"a": 10, "b": 20, "c": 30, "d": 40}
    for i, (key, nbytes) in enumerate(sizes.items()):
        policy.insert(k(key), nbytes, None, float(i))
    victims = names(policy.evict_bytes(25, 10.0))
    freed = sum(sizes[key] for key in victims)
    assert freed >= 25
    assert freed - sizes[victims[-1]] < 25  # one victim fewer would not have done
    assert policy.total_bytes == 100 - freed
    assert len(policy) == 4 - len(victims)
    assert policy.evict_bytes(0, 10.0) == []
    rest = names(policy.evict_bytes(1000, 10.0))
    assert sorted(victims + rest) == ["a", "b", "c", "d"]
    assert len(policy) == 0 and policy.total_bytes == 0


class _FifoPolicy(EvictionPolicy):
    """The smallest policy: uses the base class's default evict_bytes."""

    name = "test_fifo"

    def __init__(self) -> None:
        self.sizes: dict[BlockKey, int] = {}

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        self.sizes.setdefault(key, nbytes)

    def touch(self, key: BlockKey, now: float) -> None:
        pass

    def remove(self, key: BlockKey) -> None:
        self.sizes.pop(key, None)

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        for key in self.sizes:
            if can_evict is None or can_evict(key):
                del self.sizes[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self.sizes)

    def __contains__(self, key: object) -> bool:
        return key in self.sizes

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def test_default_evict_bytes_loops_over_evict() -> None:
    policy = _FifoPolicy()
    for key, nbytes in [("a", 10), ("b", 5), ("c", 20), ("d", 1)]:
        policy.insert(k(key), nbytes, None, 0.0)
    assert names(policy.evict_bytes(12, 0.0, veto("b"))) == ["a", "c"]
    assert names(policy.evict_bytes(100, 0.0, veto("b"))) == ["d"]
    assert policy.evict_bytes(0, 0.0) == []
    assert list(policy.sizes) == [k("b")]
    assert repr(policy) == "_FifoPolicy(1 keys, 5 bytes)"


# --- LRU ---------------------------------------------------------------------------


def test_lru_touch_reorders() -> None:
    policy = LRUPolicy()
    for key in "abcd":
        policy.insert(k(key), 1, None, 0.0)
    policy.touch(k("b"), 1.0)
    assert drain(policy) == ["a", "c", "d", "b"]


def test_lru_reinsert_counts_as_touch() -> None:
    policy = LRUPolicy()
    for key in "abc":
        policy.insert(k(key), 1, None, 0.0)
    policy.insert(k("a"), 1, None, 1.0)
    assert drain(policy) == ["b", "c", "a"]


def test_lru_remove_takes_key_out() -> None:
    policy = LRUPolicy()
    for key in "abc":
        policy.insert(k(key), 4, None, 0.0)
    policy.remove(k("b"))
    assert k("b") not in policy and len(policy) == 2 and policy.total_bytes == 8
    assert drain(policy) == ["a", "c"]


def test_lru_vetoed_key_keeps_its_place() -> None:
    policy = LRUPolicy()
    for key in "abcd":
        policy.insert(k(key), 1, None, 0.0)
    assert policy.evict(1.0, veto("a", "b")) == k("c")
    assert k("a") in policy and k("b") in policy
    assert names(policy.evict_bytes(1, 1.0, veto("a"))) == ["b"]
    assert policy.evict(1.0) == k("a")  # still the least recent
    assert drain(policy) == ["d"]


# --- weighted LRU ------------------------------------------------------------------


def test_weighted_frequent_old_block_outlives_once_hit_new_one() -> None:
    policy = WeightedLRUPolicy()
    policy.insert(k("old"), 10, None, 0.0)
    for t in range(1, 8):  # 7 hits: f = log2(8) / log2(16) = 0.75, keep 0.375
        policy.touch(k("old"), float(t))
    policy.insert(k("new"), 10, None, 100.0)
    policy.touch(k("new"), 100.0)  # 1 hit: f = 0.25, r = 1, keep 0.325
    assert policy.keep_score(k("old")) == pytest.approx(0.375)
    assert policy.keep_score(k("new")) == pytest.approx(0.325)
    assert drain(policy) == ["new", "old"]


def test_weighted_size_orders_equally_recent_blocks() -> None:
    def order(
        recency: float = 0.2, frequency: float = 0.5, size: float = 0.3
    ) -> list[str]:
        policy = WeightedLRUPolicy(recency, frequency, size)
        policy.insert(k("small"), 10, None, 0.0)
        policy.insert(k("big"), 100, None, 0.0)
        return drain(policy)

    # Same time, no hits: size is the only difference, so the big block goes first.
    assert order(0.1, 0.1, 0.8) == ["big", "small"]
    assert order() == ["big", "small"]
    # Without a size weight the scores tie and the earlier insert goes first.
    assert order(size=0.0) == ["small", "big"]


def test_weighted_recency_can_outweigh_size() -> None:
    policy = WeightedLRUPolicy(
        recency_weight=0.8, frequency_weight=0.1, size_weight=0.1
    )
    policy.insert(k("small"), 10, None, 0.0)
    policy.insert(k("big"), 100, None, 10.0)
    # small: 0.8 * 0 + 0.1 * 0.9 = 0.09; big: 0.8 * 1 + 0.1 * 0 = 0.8
    assert drain(policy) == ["small", "big"]


def test_weighted_scripted_scores_and_order() -> None:
    policy = WeightedLRUPolicy()
    policy.insert(k("e"), 40, None, 0.0)
    policy.insert(k("f"), 10, None, 2.0)
    policy.insert(k("g"), 20, None, 4.0)
    policy.touch(k("f"), 4.0)
    # r: e 0, f 1, g 1; f: f 0.25; s: e 1, f 0.25, g 0.5
    assert policy.keep_score(k("e")) == pytest.approx(0.0)
    assert policy.keep_score(k("f")) == pytest.approx(0.2 + 0.125 + 0.3 * 0.75)
    assert policy.keep_score(k("g")) == pytest.approx(0.2 + 0.3 * 0.5)
    assert policy.evict(5.0) == k("e")
    # Renormalized without e: r 1 for both; s: f 0.5, g 1.
    assert policy.keep_score(k("f")) == pytest.approx(0.2 + 0.125 + 0.15)
    assert policy.keep_score(k("g")) == pytest.approx(0.2)
    assert drain(policy) == ["g", "f"]


def test_weighted_ties_break_by_last_access_then_insertion() -> None:
    policy = WeightedLRUPolicy(
        recency_weight=0.0, frequency_weight=1.0, size_weight=0.0
    )
    policy.insert(k("x"), 1, None, 5.0)
    policy.insert(k("y"), 1, None, 5.0)
    policy.insert(k("w"), 1, None, 1.0)
    policy.insert(k("z"), 1, None, 5.0)
    assert drain(policy) == ["w", "x", "y", "z"]


def test_weighted_evict_bytes_uses_one_ranking() -> None:
    policy = WeightedLRUPolicy()
    for i, key in enumerate("abcd"):
        policy.insert(k(key), 10, None, float(i))
    policy.touch(k("a"), 10.0)
    assert names(policy.evict_bytes(20, 11.0, veto("b"))) == ["c", "d"]
    assert names(policy.evict_bytes(20, 11.0)) == ["b", "a"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"recency_weight": -0.1}, "recency_weight"),
        ({"size_weight": math.nan}, "size_weight"),
        ({"recency_weight": 0, "frequency_weight": 0, "size_weight": 0}, "all 0"),
        ({"hit_cap": 0}, "hit_cap"),
    ],
)
def test_weighted_rejects_bad_config(options: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        WeightedLRUPolicy(**options)  # type: ignore[arg-type]


# --- leaf-first LRU ----------------------------------------------------------------


def build_forest(policy: LeafFirstLRUPolicy) -> None:
    """a <- b <- c and a <- d (a branch), x <- y (another prompt)."""
    for key, parent in [("a", None), ("b", "a"), ("c", "b"), ("d", "a")]:
        policy.insert(k(key), 10, k(parent) if parent else None, 0.0)
    policy.insert(k("x"), 10, None, 0.0)
    policy.insert(k("y"), 10, k("x"), 0.0)


def test_leaf_first_evicts_chain_tail_first() -> None:
    policy = LeafFirstLRUPolicy()
    build_forest(policy)
    policy.touch(k("c"), 1.0)
    policy.touch(k("a"), 2.0)
    # Leaves d (tick 3), y (5), c (6). After y, x (4) is a leaf and older than c; after
    # c, b (1) is, and a (7) only after both b and d are gone. Plain LRU would start
    # with b.
    assert drain(policy) == ["d", "y", "x", "c", "b", "a"]


def test_leaf_first_root_waits_even_when_least_recent() -> None:
    policy = LeafFirstLRUPolicy()
    build_forest(policy)  # a is the least recent key of all
    assert names(policy.evict_bytes(30, 1.0)) == ["c", "b", "d"]
    assert policy.evict(1.0) == k("a")
    assert drain(policy) == ["y", "x"]


def test_leaf_first_parent_inserted_after_child_waits() -> None:
    policy = LeafFirstLRUPolicy()
    policy.insert(k("c"), 10, k("p"), 0.0)  # p is not tracked yet
    policy.insert(k("p"), 10, None, 1.0)
    policy.insert(k("q"), 10, None, 2.0)
    leased_c = veto("c")
    assert policy.evict(3.0, leased_c) == k("q")  # p is older but has a child
    assert policy.evict(3.0, leased_c) is None
    policy.remove(k("c"))
    assert policy.evict(3.0) == k("p")


def test_leaf_first_removing_child_frees_parent_in_lru_position() -> None:
    policy = LeafFirstLRUPolicy()
    policy.insert(k("a"), 10, None, 0.0)
    policy.insert(k("b"), 10, k("a"), 1.0)
    policy.insert(k("m"), 10, None, 2.0)
    policy.insert(k("z"), 10, None, 3.0)
    policy.touch(k("a"), 4.0)
    policy.remove(k("b"))
    assert len(policy) == 3 and policy.total_bytes == 30
    # a is a leaf again, queued at its last access (after m and z).
    assert drain(policy) == ["m", "z", "a"]


def test_leaf_first_leased_leaf_skipped_for_next_leaf() -> None:
    policy = LeafFirstLRUPolicy()
    build_forest(policy)  # leaves c (tick 2), d (3), y (5)
    assert policy.evict(1.0, veto("c")) == k("d")
    assert policy.evict(1.0, veto("c")) == k("y")
    assert policy.evict(1.0) == k("c")  # still queued at its old place
    assert drain(policy) == ["b", "a", "x"]


def test_leaf_first_parent_adopted_on_reinsert_and_self_parent_ignored() -> None:
    policy = LeafFirstLRUPolicy()
    policy.insert(k("a"), 1, None, 0.0)
    policy.insert(k("b"), 1, None, 1.0)
    policy.insert(k("b"), 1, k("a"), 2.0)  # now known to be a's child
    policy.insert(k("s"), 1, k("s"), 3.0)  # naming itself: no parent
    assert drain(policy) == ["b", "a", "s"]


def test_leaf_first_heap_stays_bounded_under_many_touches() -> None:
    policy = LeafFirstLRUPolicy()
    for key in "abc":
        policy.insert(k(key), 1, None, 0.0)
    for i in range(10_000):
        policy.touch(k("a" if i % 2 else "b"), float(i))
    assert len(policy._heap) <= 3 * len(policy) + 64 + 1
    assert drain(policy) == ["c", "b", "a"]


# --- S3-FIFO -----------------------------------------------------------------------


def test_s3fifo_one_hit_wonders_leave_from_small_first() -> None:
    policy = S3FIFOPolicy()
    for key in "abcd":
        policy.insert(k(key), 10, None, 0.0)
    policy.touch(k("a"), 1.0)
    # a is the oldest, but its hit moves it to main; b, c, d go from small first.
    assert drain(policy) == ["b", "c", "d", "a"]


def _fill(policy: EvictionPolicy, key: str, capacity_keys: int) -> None:
    policy.insert(k(key), 1, None, 0.0)
    while len(policy) > capacity_keys:
        assert policy.evict(0.0) is not None


def test_s3fifo_key_hit_in_small_survives_scan() -> None:
    s3fifo, lru = S3FIFOPolicy(), LRUPolicy()
    for policy in (s3fifo, lru):
        _fill(policy, "hot", 5)
        policy.touch(k("hot"), 0.0)
        for i in range(50):
            _fill(policy, f"scan{i}", 5)
    assert k("hot") in s3fifo and not s3fifo.in_small(k("hot"))
    assert k("hot") not in lru


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    policy = S3FIFOPolicy()
    for key in "abc":
        policy.insert(k(key), 10, None, 0.0)
    assert policy.evict(1.0) == k("a")
    assert policy.in_ghost(k("a")) and k("a") not in policy
    policy.insert(k("a"), 10, None, 2.0)
    assert k("a") in policy and not policy.in_small(k("a"))
    assert not policy.in_ghost(k("a"))
    assert policy.in_small(k("b"))
    # Small (b, c: 20 of 30 bytes) is over its 10% share, so it gives up its keys
    # before main's a, which was never hit since.
    assert drain(policy) == ["b", "c", "a"]


def test_s3fifo_scripted_order() -> None:
    policy = S3FIFOPolicy()
    for key in "abcde":
        policy.insert(k(key), 10, None, 0.0)
    for _ in range(3):
        policy.touch(k("a"), 1.0)  # freq 3 (the cap)
    policy.touch(k("c"), 1.0)  # freq 1
    # small a b c d e (50 bytes), main empty -> small's head each time:
    # a freq 3: to main, freq reset; b freq 0: evicted, ghost [b].
    assert policy.evict(2.0) == k("b")
    # small c d e (30 of 40 bytes >= 4): c freq 1 to main; d evicted, ghost [b, d].
    assert policy.evict(2.0) == k("d")
    assert policy.in_ghost(k("b")) and policy.in_ghost(k("d"))
    policy.insert(k("b"), 10, None, 3.0)  # ghost hit: main a c b, small e
    policy.touch(k("a"), 3.0)  # a freq 1
    policy.insert(k("f"), 10, None, 3.0)  # small e f (20 of 50 bytes)
    # small over 10%: e, then f (10 of 40) are evicted from small.
    # Then small is empty -> main a(1) c(0) b(0): a spends its hit and goes to the
    # tail (c b a); c, b, a are evicted in that order.
    assert drain(policy) == ["e", "f", "c", "b", "a"]
    assert not policy.in_ghost(k("c"))  # main evictions are not remembered


def test_s3fifo_main_reinsertion_spends_hits() -> None:
    policy = S3FIFOPolicy()
    for key in "xyz":
        policy.insert(k(key), 10, None, 0.0)
        policy.touch(k(key), 0.0)
    # Each has a hit, so all three move to main with counters reset; main then
    # evicts its head x, which was not hit since.
    assert policy.evict(1.0) == k("x")
    policy.touch(k("y"), 1.0)
    policy.insert(k("y"), 10, None, 1.0)  # present: counts as a hit too
    policy.touch(k("z"), 1.0)
    # main y(2) z(1): y -> tail as y(1); z -> tail as z(0); y -> tail as y(0); z goes.
    assert drain(policy) == ["z", "y"]


def test_s3fifo_small_under_its_share_yields_to_main() -> None:
    policy = S3FIFOPolicy()
    for key in "abcdefghij":
        policy.insert(k(key), 10, None, 0.0)
        policy.touch(k(key), 0.0)
    assert policy.evict(1.0) == k("a")  # all ten moved to main; a is its head
    policy.insert(k("s"), 5, None, 1.0)  # small: 5 of 95 bytes, under 10%
    assert policy.evict(1.0) == k("b")
    policy.insert(k("t"), 20, None, 1.0)  # small: 25 of 105 bytes, over 10%
    assert policy.evict(1.0) == k("s")


def test_s3fifo_resize_in_small_counts_toward_its_share() -> None:
    policy = S3FIFOPolicy()
    for key in "abcdefghij":
        policy.insert(k(key), 10, None, 0.0)
        policy.touch(k(key), 0.0)
    assert policy.evict(1.0) == k("a")  # main: b..j, 90 bytes
    policy.insert(k("s"), 1, None, 1.0)
    policy.insert(k("u"), 1, None, 1.0)  # small: 2 of 92 bytes, under 10%
    policy.insert(k("u"), 20, None, 1.0)  # small: 21 of 111 bytes, over 10%
    assert policy.total_bytes == 111
    assert policy.evict(1.0) == k("s")  # u's re-insert was a hit; s had none


def test_s3fifo_vetoed_key_keeps_its_place() -> None:
    policy = S3FIFOPolicy()
    for key in "abc":
        policy.insert(k(key), 10, None, 0.0)
    assert policy.evict(1.0, veto("a")) == k("b")
    assert policy.in_small(k("a")) and not policy.in_ghost(k("a"))
    assert policy.evict(1.0) == k("a")
    assert drain(policy) == ["c"]


def test_s3fifo_promote_hits_threshold() -> None:
    policy = S3FIFOPolicy(promote_hits=2)
    for key in "ab":
        policy.insert(k(key), 10, None, 0.0)
    policy.touch(k("a"), 1.0)  # one hit is not enough with promote_hits=2
    assert policy.evict(2.0) == k("a")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"small_ratio": 0.0}, "small_ratio"),
        ({"small_ratio": 1.0}, "small_ratio"),
        ({"promote_hits": 0}, "promote_hits"),
        ({"promote_hits": 4}, "promote_hits"),
    ],
)
def test_s3fifo_rejects_bad_config(options: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        S3FIFOPolicy(**options)  # type: ignore[arg-type]


# --- registry ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_make_policy_builds_each_name(name: str) -> None:
    policy = make_policy(name)
    assert type(policy) is POLICIES[name]
    assert policy.name == name
    assert repr(policy).endswith("(0 keys, 0 bytes)")


def test_registry_lists_exactly_the_four_policies() -> None:
    assert list(POLICIES) == ALL_NAMES


def test_make_policy_passes_options() -> None:
    policy = make_policy("s3fifo", small_ratio=0.5, promote_hits=2)
    assert isinstance(policy, S3FIFOPolicy)
    policy.insert(k("a"), 1, None, 0.0)
    policy.touch(k("a"), 0.0)
    assert policy.evict(0.0) == k("a")  # one hit short of promote_hits=2


def test_make_policy_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(ConfigError) as excinfo:
        make_policy("lfu")
    assert str(excinfo.value) == (
        "policy must be one of ['lru', 'weighted_lru', 'leaf_lru', 's3fifo'], got 'lfu'"
    )
    assert isinstance(excinfo.value, ValueError)


def test_make_policy_bad_option_is_named() -> None:
    with pytest.raises(ConfigError, match="'small_ratio'"):
        make_policy("lru", small_ratio=0.1)
    with pytest.raises(ConfigError, match="small_ratio"):
        make_policy("s3fifo", small_ratio=2.0)
    with pytest.raises(ConfigError, match="weighted_lru"):
        make_policy("weighted_lru", hit_cap="many")


# --- property test against a model -------------------------------------------------

KEY_NAMES = [f"k{i}" for i in range(8)]
key_st = st.sampled_from(KEY_NAMES)
leased_st = st.frozensets(key_st, max_size=4)
op_st = st.one_of(
    st.tuples(
        st.just("insert"),
        key_st,
        st.integers(0, 50),
        st.none() | key_st,
        st.floats(0, 5),
    ),
    st.tuples(st.just("touch"), key_st, st.floats(0, 5)),
    st.tuples(st.just("remove"), key_st),
    st.tuples(st.just("evict"), leased_st),
    st.tuples(st.just("evict_bytes"), st.integers(-5, 120), leased_st),
)


class Model:
    """What any policy must agree with: the tracked set, sizes, and who may go."""

    def __init__(self, policy_name: str) -> None:
        self.policy_name = policy_name
        self.sizes: dict[str, int] = {}
        self.parents: dict[str, str | None] = {}
        self.recency: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str, nbytes: int, parent: str | None) -> None:
        if parent == key:
            parent = None
        if key not in self.sizes or self.parents[key] is None:
            self.parents[key] = parent
        self.sizes[key] = nbytes
        self.access(key)

    def access(self, key: str) -> None:
        if key in self.sizes:
            self.recency[key] = None
            self.recency.move_to_end(key)

    def forget(self, key: str) -> None:
        del self.sizes[key], self.parents[key], self.recency[key]

    def may_evict(self, key: str, leased: frozenset[str]) -> bool:
        if key in leased:
            return False
        if self.policy_name != "leaf_lru":
            return True
        return all(self.parents[other] != key for other in self.sizes)

    def expected_victim(self, leased: frozenset[str]) -> str | None:
        """The exact victim for the LRU-ordered policies; None for the others."""
        if self.policy_name not in ("lru", "leaf_lru"):
            return None
        return next((key for key in self.recency if self.may_evict(key, leased)), None)


def check_victims(model: Model, victims: list[str], leased: frozenset[str]) -> int:
    freed = 0
    for victim in victims:
        assert victim in model.sizes, f"evicted untracked {victim}"
        assert model.may_evict(victim, leased), f"{victim} may not be evicted"
        expected = model.expected_victim(leased)
        assert expected is None or victim == expected
        freed += model.sizes[victim]
        model.forget(victim)
    return freed


def nothing_evictable(model: Model, leased: frozenset[str]) -> bool:
    return not any(model.may_evict(key, leased) for key in model.sizes)


def apply(
    policy: EvictionPolicy, model: Model, op: tuple[object, ...], now: float
) -> None:
    kind = op[0]
    if kind == "insert":
        _, key, nbytes, parent, _ = op
        assert isinstance(key, str) and isinstance(nbytes, int)
        assert parent is None or isinstance(parent, str)
        policy.insert(k(key), nbytes, k(parent) if parent else None, now)
        model.insert(key, nbytes, parent)
    elif kind == "touch":
        key = op[1]
        assert isinstance(key, str)
        policy.touch(k(key), now)
        model.access(key)
    elif kind == "remove":
        key = op[1]
        assert isinstance(key, str)
        policy.remove(k(key))
        if key in model.sizes:
            model.forget(key)
    else:
        apply_eviction(policy, model, op, now)


def apply_eviction(
    policy: EvictionPolicy, model: Model, op: tuple[object, ...], now: float
) -> None:
    leased = op[-1]
    assert isinstance(leased, frozenset)

    def can_evict(key: BlockKey) -> bool:
        return key.decode() not in leased

    if op[0] == "evict":
        victim = policy.evict(now, can_evict)
        if victim is None:
            assert nothing_evictable(model, leased)
        else:
            check_victims(model, [victim.decode()], leased)
        return
    nbytes = op[1]
    assert isinstance(nbytes, int)
    victims = names(policy.evict_bytes(nbytes, now, can_evict))
    assert len(set(victims)) == len(victims)
    sizes_before = dict(model.sizes)
    freed = check_victims(model, victims, leased)
    if nbytes <= 0:
        assert victims == []
    elif freed < nbytes:
        assert nothing_evictable(model, leased)
    else:
        assert freed - sizes_before[victims[-1]] < nbytes


@pytest.mark.parametrize("name", ALL_NAMES)
@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op_st, max_size=60))
def test_policy_matches_model(name: str, ops: list[tuple[object, ...]]) -> None:
    policy, model = make_policy(name), Model(name)
    now = 0.0
    for op in ops:
        if isinstance(op[-1], float):
            now += op[-1]
        apply(policy, model, op, now)
        assert {key for key in KEY_NAMES if k(key) in policy} == set(model.sizes)
        assert len(policy) == len(model.sizes)
        assert policy.total_bytes == sum(model.sizes.values())
