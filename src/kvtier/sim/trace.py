"""A request trace as the simulator replays it: requests of chained block keys.

Every reader (:mod:`kvtier.sim.readers`) and generator (:mod:`kvtier.sim.synth`) makes
a :class:`Trace`; the replay engines read nothing else. Keys are opaque
:data:`~kvtier.core.keys.BlockKey` values in prompt order, each block's parent being
the one before it, exactly as a :class:`~kvtier.core.keys.KeyChain` hands them to the
store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.core.keys import BlockKey
from kvtier.errors import TraceFormatError

__all__ = ["KeyInterner", "Request", "Trace", "check_num_tokens"]


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a trace.

    Attributes:
        timestamp_s: Arrival time in seconds from any fixed origin.
        keys: The chained keys of the prompt's blocks, in order (the last block may
            be partial: ``num_tokens`` says how full it is).
        num_tokens: Prompt tokens; ``(len(keys) - 1) * block_tokens < num_tokens <=
            len(keys) * block_tokens``.
        recorded_hits: Leading blocks the recording node served (access logs only).
    """

    timestamp_s: float
    keys: tuple[BlockKey, ...]
    num_tokens: int
    recorded_hits: int | None = None


@dataclass
class Trace:
    """Requests in arrival order and the block size their keys were cut at.

    Attributes:
        requests: The requests, in the order they are replayed.
        block_tokens: Tokens per block.
        name: What the trace is called in tables and plots.
        num_bad_lines: Lines a reader skipped as malformed (``skip_bad_lines``).
    """

    requests: list[Request]
    block_tokens: int
    name: str = "trace"
    num_bad_lines: int = 0
    _num_unique: int | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    @property
    def num_blocks(self) -> int:
        """Block accesses: every block of every request."""
        return sum(len(r.keys) for r in self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)

    @property
    def num_unique_blocks(self) -> int:
        """Distinct keys: the capacity past which no cache can hit more."""
        if self._num_unique is None:
            self._num_unique = len({key for r in self.requests for key in r.keys})
        return self._num_unique

    @property
    def duration_s(self) -> float:
        if not self.requests:
            return 0.0
        return self.requests[-1].timestamp_s - self.requests[0].timestamp_s

    def head(self, num_requests: int) -> Trace:
        """The first ``num_requests`` requests, as a trace of their own."""
        return Trace(self.requests[:num_requests], self.block_tokens, self.name)


class KeyInterner:
    """Turns a trace's integer block ids into keys, one key object per id.

    Keys of equal ids are the same object, so the policies' dicts compare them by
    identity first, and a trace of 300,000 accesses holds one bytes object per
    distinct block rather than per access.
    """

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[int, BlockKey] = {}

    def __call__(self, block_ids: Sequence[int]) -> tuple[BlockKey, ...]:
        keys = self._keys
        out = []
        for block_id in block_ids:
            key = keys.get(block_id)
            if key is None:
                key = keys[block_id] = BlockKey(
                    block_id.to_bytes(
                        max(8, (block_id.bit_length() + 7) // 8), "little"
                    )
                )
            out.append(key)
        return tuple(out)


def check_num_tokens(num_tokens: Any, num_blocks: int, block_tokens: int) -> int:
    """``num_tokens`` if it fits ``num_blocks`` blocks with the last one non-empty.

    Raises:
        TraceFormatError: It is not an integer in that range.
    """
    low, high = (num_blocks - 1) * block_tokens, num_blocks * block_tokens
    is_int = isinstance(num_tokens, int) and not isinstance(num_tokens, bool)
    if not (is_int and low < num_tokens <= high):
        raise TraceFormatError(
            f"'num_tokens' must be an integer in ({low}, {high}] for {num_blocks} "
            f"blocks of {block_tokens} tokens, got {num_tokens!r}"
        )
    return int(num_tokens)
