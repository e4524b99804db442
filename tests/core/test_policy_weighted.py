"""WeightedLRUPolicy: keep scores, exact victim orders, ties, batches, config."""

from __future__ import annotations

import math

import pytest
from test_policy import drain, k, names, veto

from kvtier.core.policy import WeightedLRUPolicy
from kvtier.errors import ConfigError


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
