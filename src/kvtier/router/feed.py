"""One pod's event stream: in order, and what to do when it is not.

vLLM numbers the batches of each publisher 0, 1, 2, ... A subscriber sees them in
order unless ZMQ dropped some (the subscriber joined late, a queue overflowed, the
network broke) or the engine restarted (the numbers start again at 0, the cache is
empty). :class:`Feed` classifies each batch from its sequence number and timestamp;
the ingest loop acts on the verdict:

``apply``      the next batch: apply it.
``duplicate``  already applied (a replay and the live stream overlap): skip it.
``first``      the first batch heard (since start, a reset or an expiry) is not
               batch 0: what came before is unknown; replay from 0 where the pod
               offers it, then apply.
``gap``        batches were lost: replay from the first missing one where the pod
               offers it; else the pod's index may be wrong, so drop it and go on.
``restart``    the numbers went back and the batch is newer than the last one
               applied: the engine restarted with an empty cache, so drop its blocks,
               then as for ``first``.

The timestamp tells a restart from a duplicate: both have a number below the next
expected, but only a duplicate is no newer than the last batch applied.
"""

from __future__ import annotations

import enum

__all__ = ["Feed", "Verdict"]


class Verdict(enum.Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    FIRST = "first"
    GAP = "gap"
    RESTART = "restart"


class Feed:
    """Sequence state of one pod's publisher."""

    __slots__ = ("expected", "last_ts")

    def __init__(self) -> None:
        self.expected: int | None = None
        self.last_ts = float("-inf")

    def classify(self, seq: int, ts: float) -> Verdict:
        """What batch ``seq`` (sent at ``ts``) is to this feed. No side effects."""
        if self.expected is None:
            return Verdict.APPLY if seq == 0 else Verdict.FIRST
        if seq == self.expected:
            return Verdict.APPLY
        if seq > self.expected:
            return Verdict.GAP
        return Verdict.DUPLICATE if ts <= self.last_ts else Verdict.RESTART

    def applied(self, seq: int, ts: float) -> None:
        """Batch ``seq`` was applied: the next one expected is ``seq + 1``."""
        self.expected = seq + 1
        self.last_ts = ts

    def reset(self) -> None:
        """Forget the position: the next batch is a ``first``."""
        self.expected = None
        self.last_ts = float("-inf")
