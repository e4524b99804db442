"""Fuzzing the trace readers: Mooncake, kvtier-trace JSONL and the access log.

A trace is a file someone hands the simulator; whatever it holds, reading gives a
``Trace`` whose every request can be replayed, or ``TraceFormatError`` with a message
that names the file; never another exception, a hang or unbounded memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from kvfuzz import fuzz, trees

from kvtier.errors import TraceFormatError
from kvtier.sim import ReplayConfig, read_trace, replay
from kvtier.sim.readers import TRACE_FORMATS

# Numbers that break careless readers: huge, negative, fractional, not finite.
NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.integers(0, 3000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
)
HEX = st.binary(min_size=0, max_size=20).map(bytes.hex) | st.text(max_size=34)
SCALARS = st.none() | NUMBERS | st.text(max_size=12) | HEX
VALUES = trees(SCALARS)
SMALL_LISTS = st.lists(NUMBERS | SCALARS, max_size=12)

# Each format's field names, so lines get past the first check and reach the rest.
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "mooncake": {
        "timestamp": NUMBERS,
        "input_length": NUMBERS,
        "output_length": NUMBERS,
        "hash_ids": st.lists(st.integers(-5, 2**66), max_size=12) | VALUES,
    },
    "jsonl": {
        "t": NUMBERS,
        "tokens": st.lists(st.integers(-(2**40), 2**40), max_size=40) | VALUES,
        "hashes": st.lists(st.integers(-(2**70), 2**70) | HEX, max_size=12) | VALUES,
        "num_tokens": NUMBERS,
    },
    "access-log": {
        "ts": NUMBERS,
        "keys": st.lists(HEX, max_size=8) | VALUES,
        "hits": NUMBERS,
        "num_tokens": NUMBERS,
    },
}
HEADERS = st.sampled_from(
    [
        {"format": "kvtier-trace", "block_tokens": 16},
        {"format": "kvtier-access-log", "block_tokens": 16},
    ]
) | st.fixed_dictionaries(
    {"format": st.sampled_from(["kvtier-trace", "kvtier-access-log"]) | st.text()},
    optional={"block_tokens": NUMBERS | SCALARS},
)


@st.composite
def lines(draw: st.DrawFn) -> list[str]:
    """A file's lines: an optional header, then objects mostly of one format's fields,
    some other JSON, some not JSON at all."""
    kind = draw(st.sampled_from(sorted(FIELDS)))
    out = []
    if draw(st.booleans()):
        out.append(json.dumps(draw(HEADERS)))
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 9))
        if choice < 7:
            fields = FIELDS[kind]
            names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True))
            obj = {name: draw(fields[name]) for name in names}
            out.append(json.dumps(obj))
        elif choice < 9:
            out.append(json.dumps(draw(VALUES)))
        else:
            out.append(draw(st.text(max_size=40).filter(lambda s: "\n" not in s)))
    return out


@fuzz(300)
@given(
    text=lines(),
    trace_format=st.sampled_from(TRACE_FORMATS),
    block_tokens=st.none() | st.integers(1, 64),
    skip=st.booleans(),
)
def test_fuzzed_traces_read_and_replay_or_raise_trace_format_error(
    tmp_path: Path,
    text: list[str],
    trace_format: Any,
    block_tokens: int | None,
    skip: bool,
) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(text) + "\n")
    try:
        trace = read_trace(
            path,
            trace_format=trace_format,
            block_tokens=block_tokens,
            skip_bad_lines=skip,
        )
    except TraceFormatError as exc:
        assert str(path) in str(exc)  # says which file, and what is wrong
        return
    assert trace.requests
    for request in trace.requests:
        assert request.keys
        most = len(request.keys) * trace.block_tokens
        assert most - trace.block_tokens < request.num_tokens <= most
    result = replay(trace, ReplayConfig(4, "lru"))
    assert 0.0 <= result.hit_ratio <= 1.0
