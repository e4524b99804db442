"""Replaying a trace through the store's own policies, ledger and index, without bytes.

Each request is served the way an engine uses the store: ``match`` finds the leading
stored blocks (the hits; a prefix cache can use nothing after the first miss), ``get``
touches them, and ``put`` stores the rest, where a block still stored after the miss
is only touched (recomputed, not stored twice). A put reserves room for all its new
blocks (evicting as needed) before any of them is inserted, as
:meth:`kvtier.TieredStore.put` does, so its own blocks are never its victims.

Two engines share that flow and :class:`_Tally`'s accounting:

* one tier (:class:`OneTier`): the eviction policy alone, at exact capacity (the
  watermarks at 1.0). It is the policy's own ``in``/``touch``/``insert``/``evict``
  that decide, in a loop kept tight: LRU replays over a million block accesses a
  second (``kvtier bench replay``).
* memory + disk (:class:`TwoTier`): the store's :class:`~kvtier.core.ledger.Ledger`
  and :class:`~kvtier.core.index.BlockIndex`, with its watermarks; blocks evicted from
  memory are demoted to disk when not there yet, disk hits are promoted back, and
  the write policy says when new blocks reach disk (``write_back``: only on
  demotion). It also serves one tier with watermarks below 1.

A test replays the same traces through both at exact capacity and checks every hit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvtier.config import MemoryConfig
from kvtier.core.capacity import Budget
from kvtier.core.index import BlockIndex, BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.core.ledger import Ledger, TierAccount
from kvtier.core.policy import POLICIES, make_policy
from kvtier.errors import ConfigError
from kvtier.sim.trace import Request, Trace

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "Progress",
    "ReplayConfig",
    "ReplayResult",
    "Tally",
    "OneTier",
    "TwoTier",
    "default_policy",
    "finish_points",
    "make_engine",
    "new_result",
    "replay",
]

DEFAULT_BLOCK_BYTES = 512 * 131072
"""A 512-token block of Llama-3-8B in bf16 (128 KiB of K and V per token): 64 MiB."""

MEMORY, DISK = 0, 1
Progress = Callable[[int], None]
"""Called now and then with the number of requests replayed so far."""
_PROGRESS_EVERY = 1024

WritePolicy = Literal["write_through", "write_behind", "write_back"]


def default_policy() -> str:
    """The store's default memory policy: what ``kvtier replay`` compares against."""
    return MemoryConfig().policy


@dataclass(frozen=True)
class ReplayConfig:
    """What to replay a trace through.

    Attributes:
        capacity_blocks: Blocks the (memory) tier holds.
        policy: Eviction policy of that tier, a name of ``kvtier.core.policy``.
        disk_capacity_blocks: Blocks a disk tier below it holds (0: no disk tier).
        disk_policy: The disk tier's policy (default: ``policy``).
        block_bytes: Bytes of one block, for the bytes-written figures.
        high_watermark: As ``store.high_watermark`` (1.0: evict only when full).
        low_watermark: As ``store.low_watermark``.
        write_policy: As ``store.write_policy``: ``write_back`` writes a block to
            disk only when memory evicts it; the others, as soon as it is put.
        window_s: Width of the windows of the hit-ratio-over-time series.
        hints: Replay as an engine that passes finish hints would
            (:meth:`kvtier.TieredStore.finish`): after each request, a prompt no
            later request continues is finished whole (its conversation is over),
            and otherwise its partial last block is. Taken from the trace, so it
            models an application that knows when its conversations end.
    """

    capacity_blocks: int
    policy: str = field(default_factory=default_policy)
    disk_capacity_blocks: int = 0
    disk_policy: str | None = None
    block_bytes: int = DEFAULT_BLOCK_BYTES
    high_watermark: float = 1.0
    low_watermark: float = 1.0
    write_policy: WritePolicy = "write_behind"
    window_s: float = 60.0
    hints: bool = False

    def __post_init__(self) -> None:
        for name in ("capacity_blocks", "disk_capacity_blocks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (self.policy, self.disk_policy or self.policy):
            if name not in POLICIES:
                raise ConfigError(
                    f"policy must be one of {list(POLICIES)}, got {name!r}"
                )
        if self.block_bytes <= 0 or self.window_s <= 0:
            raise ConfigError("block_bytes and window_s must be > 0")
        Budget(0, self.high_watermark, self.low_watermark)  # validates the marks

    @property
    def tiered(self) -> bool:
        """Whether the ledger engine is needed (a disk tier, or watermarks)."""
        return self.disk_capacity_blocks > 0 or self.low_watermark < 1.0


@dataclass
class ReplayResult:
    """What a replay measured.

    Attributes:
        policy: The policy (``"min"`` for Belady's bound).
        capacity_blocks: Blocks of the (memory) tier.
        disk_capacity_blocks: Blocks of the disk tier (0: none).
        block_tokens: Tokens per block of the trace.
        block_bytes: Bytes per block.
        num_requests: Requests replayed.
        num_blocks: Block accesses (every block of every request).
        num_tokens: Prompt tokens of all requests.
        hit_blocks: Leading blocks found stored, over all requests.
        memory_hit_blocks: Of those, the ones found in memory.
        hit_tokens: Prompt tokens those blocks cover: prefill tokens saved.
        blocks_written: Per tier, blocks written into it (new, promoted, demoted).
        evictions: Per tier, blocks evicted.
        window_s: Width of a window of ``timeline``.
        timeline: Per window of ``window_s`` from the first request: (block
            accesses, hit blocks).
        request_hits: Hit blocks of each request, in order.
    """

    policy: str
    capacity_blocks: int
    disk_capacity_blocks: int
    block_tokens: int
    block_bytes: int
    num_requests: int = 0
    num_blocks: int = 0
    num_tokens: int = 0
    hit_blocks: int = 0
    memory_hit_blocks: int = 0
    hit_tokens: int = 0
    blocks_written: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    window_s: float = 60.0
    timeline: list[tuple[int, int]] = field(default_factory=list)
    request_hits: list[int] = field(default_factory=list, repr=False)

    @property
    def hit_ratio(self) -> float:
        """Hit blocks over block accesses."""
        return self.hit_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def token_hit_ratio(self) -> float:
        """Prefill tokens saved over prompt tokens."""
        return self.hit_tokens / self.num_tokens if self.num_tokens else 0.0

    @property
    def bytes_written(self) -> dict[str, int]:
        """Per tier, bytes written into it (for disk: the SSD's wear)."""
        return {tier: n * self.block_bytes for tier, n in self.blocks_written.items()}

    def ratio_over_time(self) -> list[tuple[float, float]]:
        """(window start in seconds, hit ratio) for each window with accesses."""
        return [
            (i * self.window_s, hits / accesses)
            for i, (accesses, hits) in enumerate(self.timeline)
            if accesses
        ]


class Tally:
    """Adds up what every engine reports per request (one accounting for all)."""

    def __init__(self, result: ReplayResult, start_s: float) -> None:
        self.result = result
        self._start_s = start_s
        self._accesses: list[int] = []
        self._hits: list[int] = []

    def add(self, request: Request, hits: int, memory_hits: int) -> None:
        result = self.result
        num_blocks = len(request.keys)
        result.num_requests += 1
        result.num_blocks += num_blocks
        result.num_tokens += request.num_tokens
        result.hit_blocks += hits
        result.memory_hit_blocks += memory_hits
        result.hit_tokens += (
            request.num_tokens if hits == num_blocks else hits * result.block_tokens
        )
        result.request_hits.append(hits)
        window = max(0, int((request.timestamp_s - self._start_s) / result.window_s))
        while len(self._accesses) <= window:
            self._accesses.append(0)
            self._hits.append(0)
        self._accesses[window] += num_blocks
        self._hits[window] += hits

    def finish(self) -> ReplayResult:
        self.result.timeline = list(zip(self._accesses, self._hits, strict=True))
        return self.result


def replay(
    trace: Trace, config: ReplayConfig, progress: Progress | None = None
) -> ReplayResult:
    """Replays ``trace`` through the tiers ``config`` describes.

    Raises:
        ConfigError: A policy name is unknown.
    """
    engine = make_engine(config)
    tally = Tally(new_result(trace, config, config.policy), _start(trace))
    cuts = finish_points(trace) if config.hints else None
    for done, request in enumerate(trace.requests):
        hits, memory_hits = engine.serve(request.keys, request.timestamp_s)
        tally.add(request, hits, memory_hits)
        if cuts is not None and cuts[done] < len(request.keys):
            engine.finish(request.keys[cuts[done] :], request.timestamp_s)
        if progress is not None and done % _PROGRESS_EVERY == 0:
            progress(done)
    result = tally.finish()
    result.blocks_written, result.evictions = engine.counts()
    return result


def finish_points(trace: Trace) -> list[int]:
    """Per request, where the keys an engine would finish after it start (its
    ``len(keys)``: none): 0 when no later request holds its last full block (the
    conversation is over; a later request holding it continues it), else the partial
    last block's position when there is one."""
    last_use: dict[BlockKey, int] = {}
    for i, request in enumerate(trace.requests):
        for key in request.keys:
            last_use[key] = i
    block_tokens = trace.block_tokens
    cuts = []
    for i, request in enumerate(trace.requests):
        num_full = len(request.keys) - (request.num_tokens % block_tokens != 0)
        if num_full == 0 or last_use[request.keys[num_full - 1]] == i:
            cuts.append(0)
        else:
            cuts.append(num_full)
    return cuts


def make_engine(config: ReplayConfig) -> OneTier | TwoTier:
    """The engine that serves requests for ``config`` (see the module doc)."""
    return TwoTier(config) if config.tiered else OneTier(config)


def new_result(trace: Trace, config: ReplayConfig, policy: str) -> ReplayResult:
    """An empty result for ``trace`` replayed under ``config`` by ``policy``."""
    return ReplayResult(
        policy=policy,
        capacity_blocks=config.capacity_blocks,
        disk_capacity_blocks=config.disk_capacity_blocks,
        block_tokens=trace.block_tokens,
        block_bytes=config.block_bytes,
        window_s=config.window_s,
    )


def _start(trace: Trace) -> float:
    return trace.requests[0].timestamp_s if trace.requests else 0.0


class OneTier:
    """One tier of ``capacity_blocks`` run by its policy alone; see the module doc."""

    def __init__(self, config: ReplayConfig) -> None:
        self.policy = make_policy(config.policy)
        self.capacity = config.capacity_blocks
        self.block_bytes = config.block_bytes
        self.size = 0  # blocks tracked or reserved
        self.num_inserted = 0
        self.num_evicted = 0

    def match(self, keys: Sequence[BlockKey]) -> int:
        """Leading blocks of ``keys`` stored (no side effects)."""
        contains = self.policy.__contains__
        hits, num_keys = 0, len(keys)
        while hits < num_keys and contains(keys[hits]):
            hits += 1
        return hits

    def serve(self, keys: Sequence[BlockKey], now: float) -> tuple[int, int]:
        """Match, get and put one request; returns its hits (twice: all in memory)."""
        policy = self.policy
        contains, touch = policy.__contains__, policy.touch
        hits = 0
        for key in keys:  # match and get in one pass: a touch moves no key out
            if not contains(key):
                break
            touch(key, now)
            hits += 1
        reserved: list[int] = []
        size, capacity, evict = self.size, self.capacity, policy.evict
        for pos in range(hits, len(keys)):  # inlined: the loop runs once per block
            key = keys[pos]
            if contains(key):
                touch(key, now)
                continue
            if size < capacity:
                size += 1
            elif evict(now) is not None:
                self.num_evicted += 1  # one out, one reserved: size unchanged
            else:
                continue  # all that is left is this put's own reservations
            reserved.append(pos)
        self.size = size
        block_bytes = self.block_bytes
        for pos in reserved:
            policy.insert(keys[pos], block_bytes, keys[pos - 1] if pos else None, now)
        self.num_inserted += len(reserved)
        return hits, hits

    def finish(self, keys: Sequence[BlockKey], now: float) -> None:
        """An engine's finish hint (see :meth:`EvictionPolicy.finish`)."""
        self.policy.finish(keys, now)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        return {"memory": self.num_inserted}, {"memory": self.num_evicted}


class TwoTier:
    """Memory (+ disk) through the store's ledger; see the module doc."""

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        marks = (config.high_watermark, config.low_watermark)
        accounts = [
            TierAccount.create(
                make_policy(config.policy),
                config.capacity_blocks * config.block_bytes,
                None,
                *marks,
            )
        ]
        self.has_disk = config.disk_capacity_blocks > 0
        if self.has_disk:
            accounts.append(
                TierAccount.create(
                    make_policy(config.disk_policy or config.policy),
                    config.disk_capacity_blocks * config.block_bytes,
                    None,
                    *marks,
                )
            )
        self.ledger = Ledger(BlockIndex(), accounts)
        self.written = [0] * len(accounts)
        self.evicted = [0] * len(accounts)

    def match(self, keys: Sequence[BlockKey]) -> int:
        """Leading blocks of ``keys`` stored in any tier (no side effects)."""
        return self.ledger.index.match_prefix(keys, 0.0).num_blocks

    def serve(self, keys: Sequence[BlockKey], now: float) -> tuple[int, int]:
        ledger, index = self.ledger, self.ledger.index
        hits = memory_hits = 0
        for key in keys:
            entry = index.get(key, now)
            if entry is None:
                break
            hits += 1
            memory_hits += entry.in_tier(MEMORY)
        for pos in range(hits):
            ledger.touch(keys[pos], now)
            if not ledger.holds(MEMORY, keys[pos]):  # promoted: clean, stays on disk
                self._store(MEMORY, keys[pos], self._meta(keys, pos), now)
        reserved: list[tuple[BlockKey, BlockMeta]] = []
        for pos in range(hits, len(keys)):
            if not ledger.touch(keys[pos], now):
                meta = self._meta(keys, pos)
                if self._reserve(MEMORY, meta, now):
                    reserved.append((keys[pos], meta))
        for key, meta in reserved:
            self._charge(MEMORY, key, meta, now)
            if self.has_disk and self.config.write_policy != "write_back":
                self._store(DISK, key, meta, now)
        return hits, memory_hits

    def finish(self, keys: Sequence[BlockKey], now: float) -> None:
        """An engine's finish hint, to every tier's policy."""
        self.ledger.finish(keys, now)

    def _meta(self, keys: Sequence[BlockKey], pos: int) -> BlockMeta:
        return BlockMeta(self.config.block_bytes, parent=keys[pos - 1] if pos else None)

    def _store(self, tier_id: int, key: BlockKey, meta: BlockMeta, now: float) -> None:
        if self._reserve(tier_id, meta, now):
            self._charge(tier_id, key, meta, now)

    def _charge(self, tier_id: int, key: BlockKey, meta: BlockMeta, now: float) -> None:
        self.ledger.charge(tier_id, key, meta, now, held=True)
        self.written[tier_id] += 1

    def _reserve(self, tier_id: int, meta: BlockMeta, now: float) -> bool:
        ledger = self.ledger
        if not ledger.fits_ever(tier_id, meta):
            return False
        _, nbytes = ledger.room_needed(tier_id, meta)
        if nbytes:
            for victim in ledger.victims(tier_id, nbytes, now):
                self._evicted(tier_id, victim, now)
        if not ledger.has_room(tier_id, meta):
            return False
        ledger.hold(tier_id, meta)
        return True

    def _evicted(self, tier_id: int, key: BlockKey, now: float) -> None:
        self.evicted[tier_id] += 1
        ledger = self.ledger
        if tier_id == MEMORY and self.has_disk and not ledger.holds(DISK, key):
            entry = ledger.index.entry(key)
            assert entry is not None, "a memory victim has an index entry"
            self._store(DISK, key, entry.meta, now)  # demoted, like the store does
        ledger.discharge(tier_id, key)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        names = ("memory", "disk")[: len(self.written)]
        return dict(zip(names, self.written, strict=True)), dict(
            zip(names, self.evicted, strict=True)
        )
