"""Readers of request traces: Mooncake, a generic JSONL, and kvtier's access log.

Three formats, all JSON Lines (one JSON object per line, blank lines ignored):

* **Mooncake** (``mooncake``), as released with the FAST'25 paper: ``{"timestamp":
  ms, "input_length": tokens, "output_length": tokens, "hash_ids": [int, ...]}``. Each
  id names one block of ``block_tokens`` (512 in the released traces) and is already
  chained: equal ids at position i mean equal first i + 1 blocks.
* **Generic** (``jsonl``): an optional header line ``{"format": "kvtier-trace",
  "block_tokens": N}``, then ``{"t": seconds, "tokens": [int, ...]}`` (the prompt's
  token ids, cut into blocks and chained the way the store does) or ``{"t": seconds,
  "hashes": [int or hex str, ...], "num_tokens": N}`` (one engine hash per block, not
  necessarily chained: they are folded into a chain as
  :func:`~kvtier.core.keys.engine_keys` does; ``num_tokens`` defaults to full
  blocks).
* **Access log** (``access-log``): what a kvtier node records, see
  :mod:`kvtier.sim.access_log`.

``format="auto"`` picks one from the first line. A malformed line raises
:class:`~kvtier.errors.TraceFormatError` naming the file, the line number and what was
wrong; with ``skip_bad_lines=True`` it is skipped and counted in
``Trace.num_bad_lines`` instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from kvtier.core.keys import MAX_BLOCK_TOKENS, Namespace, block_keys, engine_keys
from kvtier.errors import KeyFormatError, TraceFormatError
from kvtier.sim.access_log import ACCESS_LOG_HEADER, parse_access_line
from kvtier.sim.trace import KeyInterner, Request, Trace, check_num_tokens

__all__ = ["TRACE_FORMATS", "TraceFormat", "detect_format", "read_trace"]

TraceFormat = Literal["auto", "mooncake", "jsonl", "access-log"]
TRACE_FORMATS: tuple[TraceFormat, ...] = ("auto", "mooncake", "jsonl", "access-log")
MOONCAKE_BLOCK_TOKENS = 512
GENERIC_HEADER = "kvtier-trace"

LineParser = Callable[[dict[str, Any]], Request]


def read_trace(
    path: str | os.PathLike[str],
    *,
    trace_format: TraceFormat = "auto",
    block_tokens: int | None = None,
    skip_bad_lines: bool = False,
) -> Trace:
    """Reads a trace file.

    Args:
        path: The JSONL file.
        trace_format: One of :data:`TRACE_FORMATS`; ``auto`` looks at the first line.
        block_tokens: Tokens per block; defaults to 512 for Mooncake and to the
            header's value for the other formats (256 without a header).
        skip_bad_lines: Skip and count malformed lines instead of raising.

    Raises:
        TraceFormatError: A line is malformed (and not skipped), the file cannot be
            read or holds no request, or the format cannot be told.
    """
    path = Path(path)
    lines = list(_numbered_objects(path, skip_bad_lines))
    if trace_format == "auto":
        first = next((obj for _, obj in lines if obj is not None), None)
        trace_format = detect_format(path, first)
    parser, block_tokens, lines = _parser_for(path, trace_format, block_tokens, lines)
    requests: list[Request] = []
    num_bad = _num_bad_json(path, lines)
    for line_number, obj in lines:
        if obj is None:
            continue
        try:
            requests.append(parser(obj))
        except (TraceFormatError, KeyFormatError, TypeError, ValueError) as exc:
            if not skip_bad_lines:
                raise TraceFormatError(
                    f"{path}:{line_number}: {exc}", line_number
                ) from exc
            num_bad += 1
    if not requests:
        raise TraceFormatError(f"{path}: no request in the trace")
    return Trace(requests, block_tokens, path.stem, num_bad)


def detect_format(path: Path, first: dict[str, Any] | None) -> TraceFormat:
    """The format of a trace whose first object is ``first``."""
    if first is not None:
        if ACCESS_LOG_HEADER in first:
            return "access-log"
        if "hash_ids" in first:
            return "mooncake"
        if (
            first.get("format") == GENERIC_HEADER
            or "tokens" in first
            or "hashes" in first
        ):
            return "jsonl"
    raise TraceFormatError(
        f"{path}:1: cannot tell the trace format (expected a Mooncake line with "
        f"'hash_ids', a kvtier-trace line with 'tokens' or 'hashes', or an access log "
        f"header with '{ACCESS_LOG_HEADER}'); pass the format explicitly",
        1,
    )


def _numbered_objects(
    path: Path, skip_bad_lines: bool
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, object) per non-blank line; ``None`` for a skipped bad line."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read the trace: {exc}") from exc
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError(
                        f"expected a JSON object, got {type(obj).__name__}"
                    )
            except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError too
                if not skip_bad_lines:
                    raise TraceFormatError(
                        f"{path}:{line_number}: not a JSON object: {exc}", line_number
                    ) from exc
                obj = None
            yield line_number, obj


def _num_bad_json(path: Path, lines: list[tuple[int, dict[str, Any] | None]]) -> int:
    return sum(obj is None for _, obj in lines)


def _parser_for(
    path: Path,
    trace_format: TraceFormat,
    block_tokens: int | None,
    lines: list[tuple[int, dict[str, Any] | None]],
) -> tuple[LineParser, int, list[tuple[int, dict[str, Any] | None]]]:
    """The line parser, the block size, and the lines left once a header is read."""
    if trace_format == "mooncake":
        tokens = block_tokens or MOONCAKE_BLOCK_TOKENS
        return _mooncake_parser(tokens), tokens, lines
    header: dict[str, Any] = {}
    marker = ACCESS_LOG_HEADER if trace_format == "access-log" else "format"
    if lines and lines[0][1] is not None and marker in lines[0][1]:
        header, lines = lines[0][1], lines[1:]
    tokens = block_tokens or _header_block_tokens(path, header)
    if trace_format == "access-log":
        return (lambda obj: parse_access_line(obj, tokens)), tokens, lines
    if trace_format == "jsonl":
        return _generic_parser(tokens), tokens, lines
    raise TraceFormatError(
        f"trace format must be one of {TRACE_FORMATS}, got {trace_format!r}"
    )


def _header_block_tokens(path: Path, header: dict[str, Any]) -> int:
    value = header.get("block_tokens", 256)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 0 < value <= MAX_BLOCK_TOKENS
    ):
        raise TraceFormatError(
            f"{path}:1: header 'block_tokens' must be an integer in "
            f"[1, {MAX_BLOCK_TOKENS}], got {value!r}",
            1,
        )
    return value


def _mooncake_parser(block_tokens: int) -> LineParser:
    intern = KeyInterner()

    def parse(obj: dict[str, Any]) -> Request:
        timestamp_ms = _number(obj, "timestamp")
        num_tokens = _positive_int(obj, "input_length")
        ids = obj.get("hash_ids")
        if not isinstance(ids, list) or not ids:
            raise TraceFormatError("'hash_ids' must be a non-empty list of integers")
        if not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise TraceFormatError("'hash_ids' must hold non-negative integers only")
        expected = math.ceil(num_tokens / block_tokens)
        if len(ids) != expected:
            raise TraceFormatError(
                f"{len(ids)} hash_ids for input_length {num_tokens} at {block_tokens} "
                f"tokens per block (expected {expected}; is the block size right?)"
            )
        return Request(timestamp_ms / 1000.0, intern(ids), num_tokens)

    return parse


def _generic_parser(block_tokens: int) -> LineParser:
    namespace = Namespace("kvtier-trace", block_tokens=block_tokens)

    def parse(obj: dict[str, Any]) -> Request:
        timestamp_s = _number(obj, "t")
        if "tokens" in obj:
            tokens = obj["tokens"]
            if not isinstance(tokens, list):
                raise TraceFormatError("'tokens' must be a list of token ids")
            chain = block_keys(namespace, tokens)  # full blocks only, as the store
            if not chain:
                raise TraceFormatError(
                    f"fewer than {block_tokens} tokens: no full block"
                )
            return Request(timestamp_s, tuple(chain), len(chain) * block_tokens)
        hashes = obj.get("hashes")
        if not isinstance(hashes, list) or not hashes:
            raise TraceFormatError("a line needs 'tokens' or a non-empty list 'hashes'")
        chain = engine_keys(namespace, [_engine_hash(h) for h in hashes])
        num_tokens = obj.get("num_tokens", len(chain) * block_tokens)
        check_num_tokens(num_tokens, len(chain), block_tokens)
        return Request(timestamp_s, tuple(chain), num_tokens)

    return parse


def _engine_hash(value: Any) -> bytes | int:
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError as exc:
            raise TraceFormatError(f"hash {value!r} is not hex") from exc
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TraceFormatError(f"a hash must be an integer or a hex string, got {value!r}")


def _number(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceFormatError(f"'{name}' must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise TraceFormatError(f"'{name}' must be finite and >= 0, got {value!r}")
    return float(value)


def _positive_int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TraceFormatError(f"'{name}' must be a positive integer, got {value!r}")
    return value
