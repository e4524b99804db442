"""LFUPolicy: counts, dynamic aging, ties, vetoes."""

from __future__ import annotations

from test_policy import drain, k, names, veto

from kvtier.core.policy import LFUPolicy


def test_lfu_fewest_accesses_first_ties_to_least_recent() -> None:
    policy = LFUPolicy()
    for key in "abc":
        policy.insert(k(key), 1, None, 0.0)
    policy.touch(k("a"), 1.0)
    policy.touch(k("a"), 1.0)
    policy.touch(k("c"), 1.0)
    # a: 3 accesses, c: 2, b: 1.
    assert drain(policy) == ["b", "c", "a"]


def test_lfu_aging_lets_new_keys_overtake_old_counts() -> None:
    policy = LFUPolicy()
    policy.insert(k("old"), 1, None, 0.0)
    for _ in range(2):
        policy.touch(k("old"), 0.0)  # priority 3
    policy.insert(k("x"), 1, None, 1.0)  # priority 1
    assert policy.evict(2.0) == k("x")
    assert policy.age == 1
    policy.insert(k("y"), 1, None, 3.0)  # 1 + 1 = 2
    assert policy.evict(3.0) == k("y")
    policy.insert(k("z"), 1, None, 4.0)  # 2 + 1 = 3: ties with old, which is older
    assert drain(policy) == ["old", "z"]


def test_lfu_vetoed_key_keeps_its_priority() -> None:
    policy = LFUPolicy()
    for key in "abc":
        policy.insert(k(key), 5, None, 0.0)
    policy.touch(k("c"), 0.0)
    assert names(policy.evict_bytes(6, 0.0, veto("a"))) == ["b", "c"]
    assert policy.total_bytes == 5 and drain(policy) == ["a"]


def test_lfu_heap_is_rebuilt_under_many_touches() -> None:
    policy = LFUPolicy()
    for key in "ab":
        policy.insert(k(key), 1, None, 0.0)
    for _ in range(500):
        policy.touch(k("a"), 0.0)
    assert len(policy._heap) <= 3 * len(policy) + LFUPolicy._HEAP_SLACK + 1
    assert drain(policy) == ["b", "a"]
