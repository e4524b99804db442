"""Small traces for the simulator's tests, and a hypothesis strategy of them."""

from __future__ import annotations

from hypothesis import strategies as st

from kvtier.core.keys import BlockKey
from kvtier.sim.trace import Request, Trace


def key(name: str) -> BlockKey:
    return BlockKey(name.encode())


def trace_of(*prompts: str, block_tokens: int = 4, gap_s: float = 1.0) -> Trace:
    """A request per string, one block per character: "abc" is blocks a, b, c.

    Characters stand for chained keys, so a character must always follow the same
    prefix (the tests' prompts keep to that).
    """
    requests = [
        Request(i * gap_s, tuple(key(c) for c in prompt), len(prompt) * block_tokens)
        for i, prompt in enumerate(prompts)
    ]
    return Trace(requests, block_tokens, "test")


@st.composite
def chained_traces(draw: st.DrawFn, max_nodes: int = 14) -> Trace:
    """Requests that are root-to-node paths of a random prefix tree of keys."""
    num_nodes = draw(st.integers(1, max_nodes))
    parents = [None] + [draw(st.integers(0, i - 1)) for i in range(1, num_nodes)]
    paths: list[tuple[BlockKey, ...]] = []
    for node in range(num_nodes):
        path, at = [], node
        while at is not None:
            path.append(BlockKey(f"n{at}".encode()))
            at = parents[at]
        paths.append(tuple(reversed(path)))
    picks = draw(st.lists(st.integers(0, num_nodes - 1), min_size=1, max_size=40))
    gaps = draw(st.lists(st.floats(0, 50), min_size=len(picks), max_size=len(picks)))
    now, requests = 0.0, []
    for pick, gap in zip(picks, gaps, strict=True):
        now += gap
        requests.append(Request(now, paths[pick], len(paths[pick]) * 16))
    return Trace(requests, 16, "random")
