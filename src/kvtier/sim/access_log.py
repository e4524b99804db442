"""The access log a kvtier node records, and its writer.

The log lets an operator replay their own traffic in ``kvtier replay``. It holds block
keys (hashes) only, never token ids, so nothing private leaves the node. JSON Lines:

* a header line ``{"kvtier_access_log": 1, "block_tokens": 256, "node": "name"}``;
* one line per request the node served::

      {"ts": 1732300000.25, "keys": ["9f2c...", ...], "hits": 3}

  ``ts`` is the arrival time in seconds (Unix time, or any fixed origin); ``keys``
  the request's chained block keys in prompt order, as lowercase hex; ``hits`` how
  many leading blocks the node served from its tiers (a prefix match). An optional
  ``"num_tokens"`` gives the prompt's tokens when its last block is partial (default:
  full blocks).

Replaying a log through the node's own policy and capacity reproduces ``hits`` (a
test checks it); replaying it through others answers what they would have done.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from kvtier.core.keys import BlockKey
from kvtier.errors import StorageError, TraceFormatError
from kvtier.sim.trace import Request, check_num_tokens

__all__ = ["ACCESS_LOG_HEADER", "AccessLogWriter", "parse_access_line"]

ACCESS_LOG_HEADER = "kvtier_access_log"
ACCESS_LOG_VERSION = 1


class AccessLogWriter:
    """Appends requests to an access log; thread-safe.

    A new (or empty) file gets the header first. Lines are flushed to the OS as they
    are written, so a crashed node loses at most the line in progress.

    Args:
        path: The log file; created if missing, appended to if not.
        block_tokens: Tokens per block of the node's keys.
        node: A name for the node, kept in the header.

    Raises:
        StorageError: The file cannot be opened.
    """

    def __init__(
        self, path: str | os.PathLike[str], block_tokens: int, node: str = ""
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._file: IO[str] = self.path.open("a", encoding="utf-8")
            if self._file.tell() == 0:
                self._write_line(
                    {
                        ACCESS_LOG_HEADER: ACCESS_LOG_VERSION,
                        "block_tokens": block_tokens,
                        "node": node,
                    }
                )
        except OSError as exc:
            raise StorageError(f"cannot open access log {self.path}: {exc}") from exc

    def record(
        self,
        timestamp_s: float,
        keys: Sequence[BlockKey],
        hits: int,
        num_tokens: int | None = None,
    ) -> None:
        """Appends one request: its keys and how many leading blocks were hits."""
        line: dict[str, Any] = {
            "ts": timestamp_s,
            "keys": [key.hex() for key in keys],
            "hits": hits,
        }
        if num_tokens is not None:
            line["num_tokens"] = num_tokens
        with self._lock:
            try:
                self._write_line(line)
            except OSError as exc:
                raise StorageError(
                    f"cannot write access log {self.path}: {exc}"
                ) from exc

    def _write_line(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> AccessLogWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def parse_access_line(obj: dict[str, Any], block_tokens: int) -> Request:
    """One access-log line as a request.

    Raises:
        TraceFormatError: A field is missing or malformed (the message says which).
    """
    timestamp_s = obj.get("ts")
    if isinstance(timestamp_s, bool) or not isinstance(timestamp_s, int | float):
        raise TraceFormatError(f"'ts' must be a number, got {timestamp_s!r}")
    hex_keys = obj.get("keys")
    if not isinstance(hex_keys, list) or not hex_keys:
        raise TraceFormatError("'keys' must be a non-empty list of hex strings")
    try:
        keys = tuple(BlockKey(bytes.fromhex(k)) for k in hex_keys)
    except (TypeError, ValueError) as exc:
        raise TraceFormatError(f"'keys' must hold hex strings only ({exc})") from exc
    hits = obj.get("hits")
    if (
        isinstance(hits, bool)
        or not isinstance(hits, int)
        or not 0 <= hits <= len(keys)
    ):
        raise TraceFormatError(
            f"'hits' must be an integer in [0, {len(keys)}], got {hits!r}"
        )
    num_tokens = obj.get("num_tokens", len(keys) * block_tokens)
    check_num_tokens(num_tokens, len(keys), block_tokens)
    return Request(float(timestamp_s), keys, num_tokens, hits)
