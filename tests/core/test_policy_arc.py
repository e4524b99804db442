"""ARCPolicy: T1 before T2, ghost hits move the target, vetoes."""

from __future__ import annotations

from test_policy import drain, k, names, veto

from kvtier.core.policy import ARCPolicy


def test_arc_seen_once_goes_before_seen_twice() -> None:
    policy = ARCPolicy()
    for key in "abcd":
        policy.insert(k(key), 1, None, 0.0)
    policy.touch(k("b"), 1.0)
    policy.touch(k("a"), 2.0)
    assert policy.in_t2(k("a")) and policy.in_t2(k("b")) and not policy.in_t2(k("c"))
    # T1 (c, d) first while it holds more than the target (0), then T2 in LRU order.
    assert drain(policy) == ["c", "d", "b", "a"]


def test_arc_ghost_hit_in_b1_grows_the_recency_target() -> None:
    policy = ARCPolicy()
    for key in "abcd":
        policy.insert(k(key), 1, None, 0.0)
    policy.touch(k("d"), 1.0)
    assert policy.evict(2.0) == k("a")  # into ghost B1
    assert policy.target == 0
    policy.insert(k("a"), 1, None, 3.0)  # B1 remembers it: T1 was too small
    assert policy.target == 1 and policy.in_t2(k("a"))
    # T1 is b, c (2 > 1): b goes; then T1 holds 1, not more than the target: T2's
    # least recent (d), then a; c last.
    assert drain(policy) == ["b", "d", "a", "c"]


def test_arc_ghost_hit_in_b2_shrinks_the_target() -> None:
    policy = ARCPolicy()
    for key in "abc":
        policy.insert(k(key), 1, None, 0.0)
    policy.touch(k("a"), 1.0)
    assert policy.evict(1.0) == k("b")  # B1
    policy.insert(k("b"), 1, None, 2.0)  # target 1, b in T2
    assert policy.target == 1
    # T1 holds c alone, not more than the target: T2 goes, least recent first.
    assert names(policy.evict_bytes(2, 3.0)) == ["a", "b"]
    # The ghosts are bounded by the keys tracked (1 now): B2 kept only b.
    assert not policy.in_ghost(k("a")) and policy.in_ghost(k("b"))
    policy.insert(k("b"), 1, None, 4.0)  # a B2 hit: T2 was too small
    assert policy.target == 0 and policy.in_t2(k("b"))
    assert drain(policy) == ["c", "b"]


def test_arc_vetoed_key_keeps_its_place() -> None:
    policy = ARCPolicy()
    for key in "abc":
        policy.insert(k(key), 2, None, 0.0)
    assert policy.evict(1.0, veto("a")) == k("b")
    assert names(policy.evict_bytes(4, 1.0, veto("a"))) == ["c"]
    assert policy.evict(1.0, veto("a")) is None
    assert policy.total_bytes == 2 and drain(policy) == ["a"]


def test_arc_remove_and_reinsert() -> None:
    policy = ARCPolicy()
    policy.insert(k("a"), 3, None, 0.0)
    policy.insert(k("b"), 4, None, 0.0)
    policy.touch(k("b"), 0.0)
    policy.remove(k("b"))
    policy.remove(k("a"))
    assert len(policy) == 0 and policy.total_bytes == 0
    policy.insert(k("b"), 5, None, 1.0)
    assert not policy.in_t2(k("b"))  # removal is not an eviction: no ghost
    assert drain(policy) == ["b"]
