"""The block index: tiers, expiry, leases and the three match modes."""

from __future__ import annotations

import math

import pytest

from kvtier.core.index import BlockIndex, BlockMeta
from kvtier.core.keys import BlockKey


def k(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "big"))


def index_with(present: dict[int, int], expire_at: float = math.inf) -> BlockIndex:
    index = BlockIndex()
    for i, tier in present.items():
        index.add(k(i), BlockMeta(10, expire_at=expire_at), tier)
    return index


def test_prefix_match_counts_leading_blocks_and_reports_hottest_tier() -> None:
    index = index_with({0: 0, 1: 1, 2: 0, 4: 0})
    index.add(k(1), BlockMeta(10), 0)  # block 1 is in memory and on disk
    result = index.match_prefix([k(i) for i in range(6)], now=0.0)
    assert result.num_blocks == 3
    assert result.tiers == (0, 0, 0)
    index.drop_tier(k(1), 0)
    assert index.match_prefix([k(i) for i in range(6)], now=0.0).tiers == (0, 1, 0)


def test_window_match_finds_the_longest_prefix_whose_window_is_stored() -> None:
    # blocks 0..9; stored: 0, 1, 4, 5, 6, 8 -> with window 3, resume after block 6
    index = index_with({0: 0, 1: 0, 4: 0, 5: 1, 6: 0, 8: 0})
    keys = [k(i) for i in range(10)]
    result = index.match_window(keys, window=3, now=0.0)
    assert result.num_blocks == 7
    assert result.tiers == (0, 1, 0)
    # window 1: the last stored block is enough
    assert index.match_window(keys, window=1, now=0.0).num_blocks == 9
    # window 4: only the plain prefix (0, 1) works
    assert index.match_window(keys, window=4, now=0.0).num_blocks == 2
    assert index.match_window([k(7)], window=2, now=0.0).num_blocks == 0
    with pytest.raises(ValueError, match="window"):
        index.match_window(keys, window=0, now=0.0)


def test_exact_match_answers_each_key() -> None:
    index = index_with({3: 0, 7: 1})
    assert index.match_exact([k(7), k(1), k(3)], now=0.0) == [True, False, True]


def test_expired_blocks_never_match_and_are_popped_in_order() -> None:
    index = BlockIndex()
    index.add(k(1), BlockMeta(10, expire_at=5.0), 0)
    index.add(k(2), BlockMeta(10, expire_at=3.0), 0)
    index.add(k(3), BlockMeta(10), 0)
    assert index.match_prefix([k(1)], now=4.9).num_blocks == 1
    assert index.match_prefix([k(1)], now=5.0).num_blocks == 0
    assert index.get(k(2), now=3.0) is None
    assert list(index.expired(now=4.0)) == [k(2)]
    assert list(index.expired(now=10.0)) == [k(1)]
    assert list(index.expired(now=1e12)) == []


def test_tiers_and_removal() -> None:
    index = index_with({1: 0})
    index.add(k(1), BlockMeta(10), 1)
    entry = index.get(k(1), 0.0)
    assert entry is not None and entry.tier_mask == 0b11 and entry.hottest_tier == 0
    assert index.drop_tier(k(1), 0) is not None
    assert index.drop_tier(k(1), 1) is None
    assert k(1) not in index


def test_leases_expire_and_release() -> None:
    index = index_with({1: 0})
    entry = index.entry(k(1))
    assert entry is not None
    entry.lease(5.0)
    assert entry.is_leased(now=4.0)
    assert not entry.is_leased(now=5.0)  # a crashed reader's lease runs out
    entry.lease(math.inf)  # an in-process reader holds until it releases
    entry.release(5.0)
    assert entry.is_leased(now=1e12)
    entry.release(math.inf)
    assert not entry.is_leased(now=0.0)
    entry.release(math.inf)  # releasing twice is a no-op
    assert entry.lease_deadlines is None
