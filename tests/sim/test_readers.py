"""Trace readers: the three formats, auto-detection, errors with line numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvtier.core.keys import Namespace, block_keys, engine_keys
from kvtier.errors import TraceFormatError
from kvtier.sim.readers import read_trace


def write_lines(path: Path, *objects: Any) -> Path:
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objects]
    path.write_text("\n".join(lines) + "\n")
    return path


def mooncake(ts: int, tokens: int, ids: list[int]) -> dict[str, Any]:
    return {
        "timestamp": ts,
        "input_length": tokens,
        "output_length": 5,
        "hash_ids": ids,
    }


def test_mooncake_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.jsonl", mooncake(0, 600, [0, 1]), "", mooncake(1500, 1024, [0, 2])
    )
    trace = read_trace(path)
    assert trace.block_tokens == 512 and len(trace) == 2 and trace.name == "m"
    first, second = trace.requests
    assert second.timestamp_s == 1.5 and second.num_tokens == 1024
    assert first.keys[0] is second.keys[0]  # interned: one key object per id
    assert first.keys[1] != second.keys[1]
    assert trace.num_blocks == 4 and trace.num_unique_blocks == 3


def test_mooncake_errors_name_line_and_problem(tmp_path: Path) -> None:
    cases = [
        ("{not json", "not a JSON object"),
        ("[1, 2]", "expected a JSON object"),
        (mooncake(0, 600, [0]), "1 hash_ids for input_length 600"),
        (
            {"timestamp": 0, "hash_ids": [1]},
            "'input_length' must be a positive integer",
        ),
        (mooncake(-5, 600, [0, 1]), "'timestamp' must be finite and >= 0"),
        (mooncake(0, 600, [0, "x"]), "non-negative integers"),
    ]
    for bad, message in cases:
        path = write_lines(tmp_path / "bad.jsonl", mooncake(0, 10, [0]), "", bad)
        with pytest.raises(TraceFormatError, match=message) as excinfo:
            read_trace(path, trace_format="mooncake")
        assert excinfo.value.line_number == 3
        assert str(excinfo.value).startswith(f"{path}:3: ")


def test_skip_bad_lines_counts_them(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.jsonl",
        mooncake(0, 10, [0]),
        "garbage",
        mooncake(0, 600, [0]),
        mooncake(5, 10, [0]),
    )
    trace = read_trace(path, skip_bad_lines=True)
    assert len(trace) == 2 and trace.num_bad_lines == 2


def test_block_tokens_override_checks_lengths(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "q.jsonl", mooncake(0, 40, [0, 1, 2]))
    assert read_trace(path, block_tokens=16).block_tokens == 16
    with pytest.raises(TraceFormatError, match="is the block size right"):
        read_trace(path)


def test_generic_tokens_are_cut_and_chained_like_the_store(tmp_path: Path) -> None:
    tokens = list(range(40))
    path = write_lines(
        tmp_path / "g.jsonl",
        {"format": "kvtier-trace", "block_tokens": 16},
        {"t": 0.5, "tokens": tokens},
    )
    trace = read_trace(path)
    (request,) = trace.requests
    namespace = Namespace("kvtier-trace", block_tokens=16)
    assert list(request.keys) == list(block_keys(namespace, tokens))
    assert len(request.keys) == 2 and request.num_tokens == 32


def test_generic_hashes_are_folded_into_a_chain(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "h.jsonl",
        {"t": 1, "hashes": [7, "ff00"], "num_tokens": 300},
        {"t": 2, "hashes": [7]},
    )
    trace = read_trace(path)  # no header: 256 tokens per block
    first, second = trace.requests
    namespace = Namespace("kvtier-trace", block_tokens=256)
    assert list(first.keys) == list(engine_keys(namespace, [7, bytes.fromhex("ff00")]))
    assert first.num_tokens == 300 and second.num_tokens == 256
    assert second.keys[0] == first.keys[0]


def test_generic_errors(tmp_path: Path) -> None:
    cases = [
        ({"t": 1, "hashes": [7], "num_tokens": 900}, "'num_tokens' must be an integer"),
        ({"t": 1, "hashes": ["zz"]}, "is not hex"),
        ({"t": 1, "tokens": [1, 2]}, "no full block"),
        ({"t": 1, "tokens": [-1] * 300}, "token ids"),
        ({"t": "soon", "hashes": [1]}, "'t' must be a number"),
        ({"t": 1}, "needs 'tokens' or a non-empty list 'hashes'"),
    ]
    for bad, message in cases:
        path = write_lines(tmp_path / "g.jsonl", {"t": 0, "hashes": [1]}, bad)
        with pytest.raises(TraceFormatError, match=message) as excinfo:
            read_trace(path)
        assert excinfo.value.line_number == 2


def test_unknown_format_and_empty_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", {"hello": 1})
    with pytest.raises(TraceFormatError, match="cannot tell the trace format"):
        read_trace(path)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(TraceFormatError, match="cannot tell"):
        read_trace(empty)
    with pytest.raises(TraceFormatError, match="no request"):
        read_trace(empty, trace_format="mooncake")
    with pytest.raises(TraceFormatError, match="cannot read"):
        read_trace(tmp_path / "missing.jsonl")
