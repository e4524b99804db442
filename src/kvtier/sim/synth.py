"""Synthetic traces: multi-turn chats and tool-calling agents, with their own knobs.

They exist to check that a policy tuned on one trace generalizes: the shapes below
differ from the Mooncake conversation trace in think times, how often conversations
go on, prompt growth and shared prefixes. Generated the Mooncake way: each request's
prompt is the previous turn's prompt plus the answer plus a new message, cut into
blocks; the full blocks keep their ids from turn to turn, the partial last block gets
a new id (its content changes), and ids are chained like Mooncake's ``hash_ids``.
Deterministic for a seed.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass

from kvtier.errors import ConfigError
from kvtier.sim.trace import KeyInterner, Request, Trace

__all__ = ["SHAPES", "Shape", "synthetic_trace"]


@dataclass(frozen=True)
class Shape:
    """The parameters of a synthetic workload.

    Attributes:
        name: What the trace is called.
        num_sessions: Conversations (or agent runs) started.
        duration_s: Sessions start uniformly (Poisson) over this time.
        continue_probability: Chance that a session's first turn gets another turn.
        continue_gain: Added to that chance per turn already taken (capped at 0.95).
        max_turns: Turns after which a session always ends.
        think_median_s: Median time between a turn and the next (log-normal).
        think_sigma: Spread of that log-normal (its sigma).
        first_tokens: Median tokens of a session's first prompt (log-normal, sigma 1).
        turn_tokens: Median tokens a turn adds: answer plus new message (sigma 1).
        num_system_prompts: Distinct shared prefixes sessions start with.
        system_tokens: Tokens of each shared prefix.
        branch_probability: Chance that a turn is sent twice from the same history
            (a regenerated answer, parallel tool calls).
        block_tokens: Tokens per block.
    """

    name: str
    num_sessions: int = 4000
    duration_s: float = 3600.0
    continue_probability: float = 0.4
    continue_gain: float = 0.05
    max_turns: int = 40
    think_median_s: float = 90.0
    think_sigma: float = 1.0
    first_tokens: float = 4000.0
    turn_tokens: float = 600.0
    num_system_prompts: int = 1
    system_tokens: int = 512
    branch_probability: float = 0.0
    block_tokens: int = 512


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        # Chat with quick replies, a flat chance to go on, two apps.
        Shape("chat-fast", num_sessions=14000, think_median_s=40.0,
              continue_probability=0.45, continue_gain=0.0, first_tokens=5000.0,
              turn_tokens=500.0, num_system_prompts=2),
        # Chat where users come back after many minutes, long documents.
        Shape("chat-slow", num_sessions=5000, think_median_s=300.0, think_sigma=0.8,
              continue_probability=0.3, continue_gain=0.08, max_turns=12,
              first_tokens=9000.0, turn_tokens=900.0, num_system_prompts=4,
              system_tokens=1536),
        # Tool-calling agents: seconds between steps, long shared tool prefixes, many
        # steps, some parallel calls.
        Shape("agent", num_sessions=4000, duration_s=1200.0, think_median_s=8.0,
              think_sigma=0.7, continue_probability=0.85, continue_gain=0.0,
              max_turns=10, first_tokens=6000.0, turn_tokens=1500.0,
              num_system_prompts=6,
              system_tokens=6144, branch_probability=0.15),
    )
}  # fmt: skip
"""The named shapes ``kvtier replay synthetic:NAME`` accepts."""


def synthetic_trace(shape: Shape | str, seed: int = 0) -> Trace:
    """Generates a trace of ``shape`` (a :class:`Shape` or a name in :data:`SHAPES`).

    Raises:
        ConfigError: The name is unknown.
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ConfigError(
                f"synthetic shape must be one of {list(SHAPES)}, got {shape!r}"
            )
        shape = SHAPES[shape]
    return _Generator(shape, seed).run()


@dataclass(frozen=True)
class _Turn:
    ids: tuple[int, ...]  # chained block ids, the last one possibly partial
    num_tokens: int
    turn: int


class _Generator:
    def __init__(self, shape: Shape, seed: int) -> None:
        self.shape = shape
        self.rng = random.Random(seed)
        self.next_id = 0
        self.system = [
            self._fresh_ids(shape.system_tokens)
            for _ in range(shape.num_system_prompts)
        ]
        self.events: list[tuple[float, int, _Turn]] = []  # (time, order, turn)
        self.order = 0

    def run(self) -> Trace:
        shape = self.shape
        for _ in range(shape.num_sessions):
            start = self.rng.uniform(0.0, shape.duration_s)
            system = self.rng.choice(self.system)
            tokens = shape.system_tokens + self._lognormal(shape.first_tokens, 1.0)
            self._push(start, self._extend(system, shape.system_tokens, tokens, 0))
        intern = KeyInterner()
        requests = []
        while self.events:
            now, _, turn = heapq.heappop(self.events)
            requests.append(Request(now, intern(turn.ids), turn.num_tokens))
            self._follow(now, turn)
        return Trace(requests, shape.block_tokens, f"synthetic-{shape.name}")

    def _follow(self, now: float, turn: _Turn) -> None:
        shape = self.shape
        chance = min(0.95, shape.continue_probability + shape.continue_gain * turn.turn)
        if turn.turn + 1 >= shape.max_turns or self.rng.random() >= chance:
            return
        copies = 2 if self.rng.random() < shape.branch_probability else 1
        for _ in range(copies):
            think = self.rng.lognormvariate(
                math.log(shape.think_median_s), shape.think_sigma
            )
            grown = turn.num_tokens + self._lognormal(shape.turn_tokens, 1.0)
            self._push(
                now + think,
                self._extend(turn.ids, turn.num_tokens, grown, turn.turn + 1),
            )

    def _extend(
        self, ids: tuple[int, ...], num_tokens: int, new_tokens: int, turn: int
    ) -> _Turn:
        """The prompt grown from ``num_tokens`` to ``new_tokens``: full blocks kept."""
        kept = ids[: num_tokens // self.shape.block_tokens]
        num_new = math.ceil(new_tokens / self.shape.block_tokens) - len(kept)
        return _Turn(kept + self._fresh_ids_n(num_new), new_tokens, turn)

    def _fresh_ids(self, num_tokens: int) -> tuple[int, ...]:
        return self._fresh_ids_n(math.ceil(num_tokens / self.shape.block_tokens))

    def _fresh_ids_n(self, count: int) -> tuple[int, ...]:
        start = self.next_id
        self.next_id += count
        return tuple(range(start, start + count))

    def _lognormal(self, median: float, sigma: float) -> int:
        return max(1, int(self.rng.lognormvariate(math.log(median), sigma)))

    def _push(self, when: float, turn: _Turn) -> None:
        heapq.heappush(self.events, (when, self.order, turn))
        self.order += 1
