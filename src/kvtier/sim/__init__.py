"""Trace replay: what each capacity and eviction policy would have hit on a trace.

The simulator drives the store's own policies (and, for tiered runs, its ledger and
index) without bytes; ``docs/replay.md`` has the rules and the measurements::

    from kvtier.sim import ReplayConfig, belady, read_trace, replay

    trace = read_trace("conversation_trace.jsonl")
    result = replay(trace, ReplayConfig(10_000, "hit_density"))
    print(result.hit_ratio / belady(trace, 10_000).hit_ratio)   # fraction of MIN
"""

from __future__ import annotations

from kvtier.sim.access_log import AccessLogWriter
from kvtier.sim.belady import belady
from kvtier.sim.cluster import replay_cluster
from kvtier.sim.optimize import Recommendation, Sweep, knee, recommend, sweep
from kvtier.sim.readers import read_trace
from kvtier.sim.replay import ReplayConfig, ReplayResult, default_policy, replay
from kvtier.sim.synth import SHAPES, Shape, synthetic_trace
from kvtier.sim.trace import Request, Trace

__all__ = [
    "SHAPES",
    "AccessLogWriter",
    "Recommendation",
    "ReplayConfig",
    "ReplayResult",
    "Request",
    "Shape",
    "Sweep",
    "Trace",
    "belady",
    "default_policy",
    "knee",
    "read_trace",
    "recommend",
    "replay",
    "replay_cluster",
    "sweep",
    "synthetic_trace",
]
