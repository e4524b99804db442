"""LeafFirstLRUPolicy: leaves before their parents, exact orders, the lazy heap."""

from __future__ import annotations

from test_policy import drain, k, names, veto

from kvtier.core.policy import LeafFirstLRUPolicy


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
