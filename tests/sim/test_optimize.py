"""The optimizer: sweeps, the smallest capacity for a target, the knee."""

from __future__ import annotations

import pytest
from simtraces import trace_of

from kvtier.errors import ConfigError
from kvtier.sim.optimize import knee, recommend, smallest_capacity, sweep
from kvtier.sim.replay import ReplayConfig, replay
from kvtier.sim.synth import synthetic_trace


def test_sweep_results_and_json() -> None:
    trace = trace_of("ab", "cd", "ab", "cd", "ab")
    seen: list[tuple[str, int, int]] = []
    swept = sweep(
        trace, [4, 2], ["lru", "leaf_lru"], progress=lambda *a: seen.append(a)
    )
    assert swept.capacities == [2, 4]
    assert swept.results["lru"][2].hit_blocks == 0
    assert swept.bounds[2].hit_blocks == 4 and swept.bounds[4].hit_blocks == 6
    assert swept.min_ratio("lru", 4) == 1.0 and swept.min_ratio("lru", 2) == 0.0
    summary = swept.as_json()
    assert summary["policies"]["lru"]["4"]["min_ratio"] == 1.0
    assert set(summary) >= {"default_policy", "policies", "min"}
    assert ("min @ 2", 0, 5) in seen and ("leaf_lru @ 4", 0, 5) in seen
    with pytest.raises(ConfigError):
        sweep(trace, [], ["lru"])


def test_smallest_capacity_bisects_to_the_answer() -> None:
    trace = synthetic_trace("chat-fast").head(1500)
    target = 0.2
    found = smallest_capacity(trace, "lru", target, tolerance=0.0)
    assert found is not None
    assert replay(trace, ReplayConfig(found, "lru")).hit_ratio >= target
    assert replay(trace, ReplayConfig(found - 1, "lru")).hit_ratio < target
    assert smallest_capacity(trace, "lru", 0.99) is None  # more than any cache gets


def test_knee() -> None:
    assert knee([(1, 0.5), (2, 0.9), (4, 0.95), (8, 1.0)]) == 2
    assert knee([(1, 0.1)]) is None
    assert knee([(1, 0.0), (2, 0.0)]) is None


def test_recommend_uses_the_sweep() -> None:
    trace = synthetic_trace("chat-fast").head(1500)
    swept = sweep(trace, [200, 1000, 4000], ["lru"], with_bound=False)
    (rec,) = recommend(trace, swept, 0.2)
    assert rec.policy == "lru" and rec.capacity_blocks is not None
    assert rec.knee_blocks in (200, 1000, 4000)
    (none,) = recommend(trace, swept, None)
    assert none.capacity_blocks is None and none.target_hit_ratio is None
