"""The cluster view: N nodes with caches of their own, or one pooled store.

Three ways to serve a trace with ``N`` nodes of ``capacity_blocks`` each:

* ``random``: each request goes to a node drawn at random (seeded): what a
  cache-unaware load balancer does;
* ``prefix``: each request goes to the node that holds its longest prefix, the
  router's scorer, balanced: a node more than ``imbalance`` above the mean load is
  passed over, ties go to the less loaded node. Load is requests served, decayed by
  1/64 per request so it tracks the recent past;
* ``pooled``: one store of ``N * capacity_blocks``, reachable by every engine: what a
  shared pool (Mooncake's store, kvtier's shared tiers) buys.

Every node runs the replay's own engine (:func:`~kvtier.sim.replay.make_engine`), so
policies, watermarks and tiers behave as in a single-node replay.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Literal

from kvtier.core.keys import BlockKey
from kvtier.errors import ConfigError
from kvtier.sim.replay import (
    Progress,
    ReplayConfig,
    ReplayResult,
    Tally,
    finish_points,
    make_engine,
    new_result,
    replay,
)
from kvtier.sim.trace import Trace

__all__ = ["ROUTINGS", "Routing", "replay_cluster"]

Routing = Literal["random", "prefix", "pooled"]
ROUTINGS: tuple[Routing, ...] = ("random", "prefix", "pooled")
_LOAD_DECAY = 63 / 64
_Matcher = Callable[[tuple[BlockKey, ...]], int]


def replay_cluster(
    trace: Trace,
    config: ReplayConfig,
    num_nodes: int,
    routing: Routing,
    *,
    seed: int = 0,
    imbalance: float = 0.25,
    progress: Progress | None = None,
) -> ReplayResult:
    """Replays ``trace`` on ``num_nodes`` nodes of ``config`` each, as ``routing`` says.

    The result's capacities are per node; its hit figures cover the whole cluster.

    Raises:
        ConfigError: ``num_nodes`` < 1 or ``routing`` is unknown.
    """
    if num_nodes < 1:
        raise ConfigError(f"num_nodes must be >= 1, got {num_nodes}")
    if routing == "pooled":
        pooled = dataclasses.replace(
            config,
            capacity_blocks=config.capacity_blocks * num_nodes,
            disk_capacity_blocks=config.disk_capacity_blocks * num_nodes,
        )
        return replay(trace, pooled, progress)
    if routing not in ROUTINGS:
        raise ConfigError(f"routing must be one of {list(ROUTINGS)}, got {routing!r}")
    router = _Router(num_nodes, routing, seed, imbalance)
    engines = [make_engine(config) for _ in range(num_nodes)]
    start = trace.requests[0].timestamp_s if trace.requests else 0.0
    tally = Tally(new_result(trace, config, config.policy), start)
    cuts = finish_points(trace) if config.hints else None
    for done, request in enumerate(trace.requests):
        node = router.pick([engine.match for engine in engines], request.keys)
        hits, memory_hits = engines[node].serve(request.keys, request.timestamp_s)
        tally.add(request, hits, memory_hits)
        if cuts is not None and cuts[done] < len(request.keys):
            engines[node].finish(request.keys[cuts[done] :], request.timestamp_s)
        if progress is not None and done % 1024 == 0:
            progress(done)
    result = tally.finish()
    for engine in engines:
        written, evicted = engine.counts()
        _add_into(result.blocks_written, written)
        _add_into(result.evictions, evicted)
    return result


class _Router:
    def __init__(self, num_nodes: int, routing: Routing, seed: int, imbalance: float):
        self.routing = routing
        self.rng = random.Random(seed)
        self.loads = [0.0] * num_nodes
        self.imbalance = imbalance

    def pick(self, matchers: list[_Matcher], keys: tuple[BlockKey, ...]) -> int:
        loads = self.loads
        if self.routing == "random":
            node = self.rng.randrange(len(loads))
        else:
            ceiling = sum(loads) / len(loads) * (1 + self.imbalance)
            least = min(loads)
            node = max(
                (i for i, load in enumerate(loads) if load <= ceiling or load == least),
                key=lambda i: (matchers[i](keys), -loads[i], -i),
            )
        for i in range(len(loads)):
            loads[i] *= _LOAD_DECAY
        loads[node] += 1.0
        return node


def _add_into(total: dict[str, int], part: dict[str, int]) -> None:
    for tier, count in part.items():
        total[tier] = total.get(tier, 0) + count
