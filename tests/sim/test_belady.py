"""Belady's MIN: exact on hand-made traces, never beaten by a policy."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from simtraces import chained_traces, trace_of

from kvtier.core.policy import POLICIES
from kvtier.sim.belady import belady, next_uses
from kvtier.sim.replay import ReplayConfig, replay
from kvtier.sim.trace import Trace


def test_next_uses() -> None:
    assert next_uses(trace_of("ab", "ac", "ab")) == [
        2,
        5,
        4,
        math.inf,
        math.inf,
        math.inf,
    ]


def test_min_keeps_what_comes_back_soonest() -> None:
    trace = trace_of("ab", "cd", "ab", "cd", "ab")
    # Room for 2: LRU always evicts what comes next; MIN keeps a, b and skips c, d.
    assert replay(trace, ReplayConfig(2, "lru")).hit_blocks == 0
    bound = belady(trace, 2)
    assert bound.request_hits == [0, 0, 2, 0, 2]
    assert bound.policy == "min" and bound.hit_ratio == 0.4


def test_min_with_room_for_everything_hits_every_reuse() -> None:
    trace = trace_of("abc", "abd", "abc")
    assert belady(trace, 100).request_hits == [0, 2, 3]
    assert belady(trace, 0).hit_blocks == 0


@pytest.mark.parametrize("name", list(POLICIES))
@settings(max_examples=80, deadline=None)
@given(trace=chained_traces())
def test_no_policy_beats_min(name: str, trace: Trace) -> None:
    for capacity in (1, 2, 4, 7):
        bound = belady(trace, capacity).hit_blocks
        assert replay(trace, ReplayConfig(capacity, name)).hit_blocks <= bound
