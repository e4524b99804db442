"""Budgets, watermarks, quotas, and the arena allocator."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.core.alloc import SlabAllocator, slot_bytes
from kvtier.core.capacity import Budget, QuotaTable


def test_nothing_to_free_under_the_high_watermark() -> None:
    budget = Budget(1000, high_watermark=0.9, low_watermark=0.5, used_bytes=800)
    assert budget.bytes_to_free(100) == 0  # lands exactly at 900


def test_crossing_the_high_watermark_frees_down_to_the_low_one() -> None:
    budget = Budget(1000, high_watermark=0.9, low_watermark=0.5, used_bytes=850)
    assert budget.bytes_to_free(100) == 450  # 950 after the insert -> 500


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="watermarks"):
        Budget(10, high_watermark=0.5, low_watermark=0.8)
    with pytest.raises(ValueError, match="capacity_bytes"):
        Budget(-1)


def test_quota_table_limits_groups_with_a_quota_and_counts_every_group() -> None:
    quotas = QuotaTable({"acme": 100})
    quotas.add("acme", 60)
    quotas.add("other", 10_000, count=3)
    budget = quotas.budget("acme")
    assert budget is not None and budget.bytes_to_free(40) == 100 - 80
    assert quotas.budget("other") is None
    assert quotas.usage() == {"acme": 60, "other": 10_000}
    assert quotas.items() == {"acme": 1, "other": 3}
    quotas.sub("other", 10_000, count=3)
    assert quotas.usage() == {"acme": 60}


@pytest.mark.parametrize(
    "nbytes, expected",
    [
        (1, 64),
        (64, 64),
        (65, 128),
        (100, 128),
        (2 << 20, 2 << 20),
        ((2 << 20) + 1, (2 << 20) + (256 << 10)),
        (3000, 3072),
    ],
)
def test_size_classes(nbytes: int, expected: int) -> None:
    assert slot_bytes(nbytes) == expected
    assert expected - nbytes < max(64, expected // 8)


def test_allocator_fills_the_arena_and_coalesces_freed_slabs() -> None:
    alloc = SlabAllocator(arena_bytes=8 * 4096, slab_bytes=4 * 4096)
    small = [alloc.allocate(4096) for _ in range(8)]
    assert None not in small
    assert alloc.allocate(4096) is None
    assert not alloc.can_allocate(8 * 4096)
    for offset in small:
        assert offset is not None
        alloc.free(offset)
    assert alloc.used_bytes == 0
    big = alloc.allocate(8 * 4096)  # both slabs came back and merged
    assert big == 0


def test_allocator_falls_back_to_a_single_slot_slab() -> None:
    alloc = SlabAllocator(arena_bytes=3 * 1024, slab_bytes=4 * 1024)
    offsets = [alloc.allocate(1024) for _ in range(3)]
    assert sorted(o for o in offsets if o is not None) == [0, 1024, 2048]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 20_000)), max_size=80))
def test_allocated_slots_never_overlap(ops: list[tuple[bool, int]]) -> None:
    alloc = SlabAllocator(arena_bytes=256 * 1024, slab_bytes=32 * 1024)
    live: dict[int, int] = {}
    rng = random.Random(0)
    for do_free, nbytes in ops:
        if do_free and live:
            offset = rng.choice(sorted(live))
            alloc.free(offset)
            del live[offset]
            continue
        offset = alloc.allocate(nbytes)
        if offset is None:
            assert alloc.used_bytes + slot_bytes(nbytes) > 0
            continue
        size = alloc.slot_size(offset)
        assert size >= nbytes and offset + size <= alloc.arena_bytes
        for other, other_size in live.items():
            assert offset + size <= other or other + other_size <= offset
        live[offset] = size
    assert alloc.used_bytes == sum(live.values())
