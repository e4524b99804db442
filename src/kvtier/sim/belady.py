"""Belady's MIN: the most hits any cache of the same size could have had.

An offline simulator may look ahead: MIN evicts the block whose next use is furthest
in the future, counting the block being inserted among the candidates (not storing a
block is allowed: a block never used again is simply not kept). It counts hits under
the same rule as the replay (the leading stored blocks of each request), and that
costs it nothing: keys are chained, so a block's next use is never before its
parent's, MIN always gives up a child before its parent, and whatever it holds of a
request is a prefix of it. So no eviction policy of the same capacity can beat it; a
property test checks this against every policy.

Next uses are computed once, backwards over the trace; the victims come off a heap
of ``(-next_use, key)`` with lazy deletion. The conversation trace (288,500 block
accesses) takes well under a second.
"""

from __future__ import annotations

import heapq
import math

from kvtier.core.keys import BlockKey
from kvtier.sim.replay import Progress, ReplayConfig, ReplayResult, Tally, new_result
from kvtier.sim.trace import Trace

__all__ = ["belady", "next_uses"]

_NEVER = math.inf


def next_uses(trace: Trace) -> list[float]:
    """For each block access in trace order, the index of the key's next access."""
    num_accesses = trace.num_blocks
    out: list[float] = [_NEVER] * num_accesses
    seen: dict[BlockKey, int] = {}
    position = num_accesses
    for request in reversed(trace.requests):
        for key in reversed(request.keys):
            position -= 1
            out[position] = seen.get(key, _NEVER)
            seen[key] = position
    return out


def belady(
    trace: Trace, capacity_blocks: int, progress: Progress | None = None
) -> ReplayResult:
    """Replays ``trace`` through Belady's MIN with room for ``capacity_blocks``."""
    config = ReplayConfig(capacity_blocks)
    tally = Tally(new_result(trace, config, "min"), _start(trace))
    uses = next_uses(trace)
    resident: dict[BlockKey, float] = {}  # key -> its next use
    heap: list[tuple[float, BlockKey]] = []
    position = 0
    for done, request in enumerate(trace.requests):
        keys = request.keys
        hits = 0
        while hits < len(keys) and keys[hits] in resident:
            hits += 1
        for key in keys:
            next_use = uses[position]
            position += 1
            resident[key] = next_use
            heapq.heappush(heap, (-next_use, key))
            while len(resident) > capacity_blocks:
                _evict_furthest(resident, heap)
        tally.add(request, hits, hits)
        if progress is not None and done % 1024 == 0:
            progress(done)
    return tally.finish()


def _evict_furthest(
    resident: dict[BlockKey, float], heap: list[tuple[float, BlockKey]]
) -> None:
    while True:
        negative_use, key = heapq.heappop(heap)
        if resident.get(key) == -negative_use:  # else stale: used again since
            del resident[key]
            return


def _start(trace: Trace) -> float:
    return trace.requests[0].timestamp_s if trace.requests else 0.0
