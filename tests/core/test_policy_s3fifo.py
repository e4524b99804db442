"""S3FIFOPolicy: small, main and ghost FIFOs, exact victim orders, config."""

from __future__ import annotations

import pytest
from test_policy import drain, k, veto

from kvtier.core.policy import EvictionPolicy, LRUPolicy, S3FIFOPolicy
from kvtier.errors import ConfigError


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
