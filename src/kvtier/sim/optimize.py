"""The optimizer: sweep capacities and policies, recommend sizes, find the knee.

:func:`sweep` replays a trace at each capacity through each policy and through
Belady's MIN (the bound every policy is measured against). :func:`recommend` answers
two sizing questions per policy: the smallest capacity that reaches a target hit
ratio (bisecting between the swept capacities that bracket it, with a few more
replays), and the knee of the hit-ratio curve, past which more capacity buys little.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import ConfigError
from kvtier.sim.belady import belady
from kvtier.sim.replay import ReplayConfig, ReplayResult, default_policy, replay
from kvtier.sim.trace import Trace

__all__ = [
    "Recommendation",
    "Sweep",
    "knee",
    "recommend",
    "smallest_capacity",
    "sweep",
]

SweepProgress = Callable[[str, int, int], None]
"""Told (label, requests done, requests in all) as each replay of a sweep goes."""


@dataclass
class Sweep:
    """Replays of one trace at several capacities through several policies.

    Attributes:
        trace_name: The trace's name.
        capacities: The capacities swept, in blocks, ascending.
        results: Policy -> capacity -> its replay.
        bounds: Capacity -> Belady's MIN at that capacity.
    """

    trace_name: str
    capacities: list[int]
    results: dict[str, dict[int, ReplayResult]] = field(default_factory=dict)
    bounds: dict[int, ReplayResult] = field(default_factory=dict)

    def min_ratio(self, policy: str, capacity: int) -> float | None:
        """The policy's block hit ratio as a fraction of MIN's.

        Returns:
            The fraction (1.0 when MIN hits nothing), or ``None`` when the sweep ran
            without the bound.
        """
        if capacity not in self.bounds:
            return None
        bound = self.bounds[capacity].hit_ratio
        ratio = self.results[policy][capacity].hit_ratio
        return ratio / bound if bound else 1.0

    def as_json(self) -> dict[str, Any]:
        """The summary ``kvtier replay --json`` ends with (keys are strings)."""
        return {
            "default_policy": default_policy(),
            "trace": self.trace_name,
            "min": {str(c): {"hit_ratio": b.hit_ratio} for c, b in self.bounds.items()},
            "policies": {
                policy: {
                    str(capacity): {
                        "hit_ratio": result.hit_ratio,
                        "min_ratio": self.min_ratio(policy, capacity),
                        "token_hit_ratio": result.token_hit_ratio,
                        "bytes_written": result.bytes_written,
                    }
                    for capacity, result in by_capacity.items()
                }
                for policy, by_capacity in self.results.items()
            },
        }


def sweep(
    trace: Trace,
    capacities: Sequence[int],
    policies: Sequence[str],
    base: ReplayConfig | None = None,
    progress: SweepProgress | None = None,
    with_bound: bool = True,
) -> Sweep:
    """Replays ``trace`` at every capacity through every policy, and MIN.

    Args:
        trace: The trace.
        capacities: Capacities of the (memory) tier in blocks.
        policies: Policy names.
        base: Everything else of the replay (disk tier, watermarks, block bytes);
            its capacity and policy are replaced.
        progress: Told about each replay before it runs.
        with_bound: Also replay Belady's MIN at each capacity.

    Raises:
        ConfigError: A capacity is negative, a policy unknown, or none is given.
    """
    if not capacities or not policies:
        raise ConfigError("a sweep needs at least one capacity and one policy")
    base = base or ReplayConfig(0)
    result = Sweep(trace.name, sorted(set(capacities)))
    for capacity in result.capacities:
        if with_bound:
            total = capacity + base.disk_capacity_blocks
            on = _observer(progress, f"min @ {capacity:,}", trace)
            result.bounds[capacity] = belady(trace, total, on)
        for policy in policies:
            config = dataclasses.replace(base, capacity_blocks=capacity, policy=policy)
            on = _observer(progress, f"{policy} @ {capacity:,}", trace)
            result.results.setdefault(policy, {})[capacity] = replay(trace, config, on)
    return result


def _observer(
    progress: SweepProgress | None, label: str, trace: Trace
) -> Callable[[int], None] | None:
    if progress is None:
        return None
    total = len(trace)
    progress(label, 0, total)
    return lambda done: progress(label, done, total)


@dataclass(frozen=True)
class Recommendation:
    """Sizing advice for one policy.

    Attributes:
        policy: The policy.
        target_hit_ratio: The block hit ratio asked for (None: none asked).
        capacity_blocks: The smallest capacity found that reaches it, within the
            tolerance (None: no capacity does, the trace's reuse is too low).
        knee_blocks: The swept capacity at the knee of the hit-ratio curve.
    """

    policy: str
    target_hit_ratio: float | None
    capacity_blocks: int | None
    knee_blocks: int | None


def recommend(
    trace: Trace,
    swept: Sweep,
    target_hit_ratio: float | None,
    base: ReplayConfig | None = None,
    tolerance: float = 0.05,
) -> list[Recommendation]:
    """Per policy of ``swept``: the smallest capacity for the target, and the knee."""
    out = []
    for policy, by_capacity in swept.results.items():
        points = [(c, r.hit_ratio) for c, r in sorted(by_capacity.items())]
        capacity = None
        if target_hit_ratio is not None:
            capacity = smallest_capacity(
                trace, policy, target_hit_ratio, points, base, tolerance
            )
        out.append(Recommendation(policy, target_hit_ratio, capacity, knee(points)))
    return out


def smallest_capacity(
    trace: Trace,
    policy: str,
    target_hit_ratio: float,
    known: Sequence[tuple[int, float]] = (),
    base: ReplayConfig | None = None,
    tolerance: float = 0.05,
) -> int | None:
    """The smallest capacity (in blocks) at which ``policy`` reaches the target.

    Bisects between the largest known capacity below the target and the smallest at
    or above it (the number of distinct blocks, where nothing is ever evicted, if no
    known one reaches it) until the two are within ``tolerance`` of each other.

    Returns:
        The capacity, or ``None`` when even a cache that never evicts falls short.
    """
    base = base or ReplayConfig(0)

    def ratio(capacity: int) -> float:
        config = dataclasses.replace(base, capacity_blocks=capacity, policy=policy)
        return replay(trace, config).hit_ratio

    low, high = 0, None
    for capacity, hit_ratio in sorted(known):
        if hit_ratio >= target_hit_ratio:
            high = capacity
            break
        low = capacity
    if high is None:
        high = max(trace.num_unique_blocks, low + 1)
        if ratio(high) < target_hit_ratio:
            return None
    while high - low > max(1, tolerance * high):
        middle = (low + high) // 2
        if ratio(middle) >= target_hit_ratio:
            high = middle
        else:
            low = middle
    return high


def knee(points: Sequence[tuple[int, float]]) -> int | None:
    """The capacity where the curve bends most (Kneedle, Satopaa et al. 2011).

    Capacities and hit ratios are scaled to [0, 1] (the curve starting from an empty
    cache at the origin); the knee is the point furthest above the diagonal.

    Returns:
        One of the given capacities, or ``None`` for fewer than two points or a
        flat curve.
    """
    if len(points) < 2:
        return None
    top_x = max(c for c, _ in points)
    top_y = max(y for _, y in points)
    if top_x <= 0 or top_y <= 0:
        return None
    best = max(points, key=lambda p: p[1] / top_y - p[0] / top_x)
    return best[0]
