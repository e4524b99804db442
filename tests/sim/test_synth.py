"""Synthetic traces: deterministic, chained like Mooncake, of the shapes asked."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError
from kvtier.sim.synth import SHAPES, Shape, synthetic_trace


def test_same_seed_same_trace() -> None:
    shape = Shape("tiny", num_sessions=50, duration_s=100.0)
    a, b = synthetic_trace(shape, 3), synthetic_trace(shape, 3)
    assert [r.keys for r in a] == [r.keys for r in b]
    assert [r.keys for r in a] != [r.keys for r in synthetic_trace(shape, 4)]


def test_turns_extend_the_full_blocks_of_the_previous_turn() -> None:
    shape = Shape("tiny", num_sessions=30, duration_s=50.0, continue_probability=0.9)
    trace = synthetic_trace(shape)
    times = [r.timestamp_s for r in trace]
    assert times == sorted(times)
    by_first_new: dict[object, int] = {}
    for request in trace:
        full = (request.num_tokens - 1) // trace.block_tokens  # blocks surely full
        assert len(request.keys) == -(-request.num_tokens // trace.block_tokens)
        for position in range(1, len(request.keys)):
            # chained: a key always follows the same parent
            parent = by_first_new.setdefault(request.keys[position], position)
            assert parent == position
        assert full <= len(request.keys)


def test_named_shapes_and_unknown_name() -> None:
    assert set(SHAPES) == {"chat-fast", "chat-slow", "agent"}
    with pytest.raises(ConfigError, match="synthetic shape must be one of"):
        synthetic_trace("chat-medium")
