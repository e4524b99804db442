"""Rendezvous placement: balance, minimal movement, weights, zones, determinism."""

from __future__ import annotations

import collections
import os

import pytest

from kvtier.core.placement import Member, Placement

KEYS = [os.urandom(16) for _ in range(100_000)]


def primaries(placement: Placement, keys: list[bytes]) -> list[str]:
    return [replicas[0] for replicas in placement.replicas(keys, 1)]


@pytest.mark.parametrize("nodes", [3, 10])
def test_keys_spread_evenly(nodes: int) -> None:
    placement = Placement([Member(f"n{i}") for i in range(nodes)])
    counts = collections.Counter(primaries(placement, KEYS))
    mean = len(KEYS) / nodes
    assert len(counts) == nodes and max(counts.values()) / mean <= 1.05


def test_a_join_moves_about_one_nth_of_the_keys_and_only_to_the_new_node() -> None:
    before = primaries(Placement([Member(f"n{i}") for i in range(3)]), KEYS)
    after = primaries(Placement([Member(f"n{i}") for i in range(4)]), KEYS)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert 0.23 < len(moved) / len(KEYS) < 0.27
    assert all(a == "n3" for _, a in moved)


def test_a_leave_moves_only_the_leavers_keys() -> None:
    before = primaries(Placement([Member(f"n{i}") for i in range(4)]), KEYS)
    after = primaries(Placement([Member(f"n{i}") for i in range(3)]), KEYS)
    assert all(b == "n3" for b, a in zip(before, after, strict=True) if b != a)


def test_weights_give_proportional_shares() -> None:
    placement = Placement([Member("big", weight=3.0), Member("small", weight=1.0)])
    counts = collections.Counter(primaries(placement, KEYS))
    assert 0.72 < counts["big"] / len(KEYS) < 0.78


def test_replicas_are_distinct_and_spread_over_zones() -> None:
    members = [Member(f"n{i}", zone=f"z{i % 2}") for i in range(4)]
    placement = Placement(members)
    zone = {m.node_id: m.zone for m in members}
    for replicas in placement.replicas(KEYS[:2000], 2):
        assert len(set(replicas)) == 2
        assert {zone[r] for r in replicas} == {"z0", "z1"}
    three = placement.replicas(KEYS[:100], 3)  # more replicas than zones: reuse one
    assert all(len(set(r)) == 3 for r in three)
    assert placement.replicas(KEYS[:5], 9) == placement.ranked(KEYS[:5])


def test_placement_is_deterministic_and_independent_of_member_order() -> None:
    a = Placement([Member("x"), Member("y"), Member("z")])
    b = Placement([Member("z"), Member("x"), Member("y")])
    assert a.replicas(KEYS[:500], 2) == b.replicas(KEYS[:500], 2)
    assert Placement([]).replicas(KEYS[:2], 2) == [[], []]
