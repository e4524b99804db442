"""LRUPolicy: exact victim orders, re-inserts, removal, vetoes."""

from __future__ import annotations

from test_policy import drain, k, names, veto

from kvtier.core.policy import LRUPolicy


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
