"""One pod's engine blocks, folded into kvtier's own block keys.

An engine hashes blocks of ``block_size`` tokens (vLLM: 16) with its own function and
seed; kvtier keys blocks of ``block_tokens`` tokens (256) with xxh3 over a namespace.
The router never needs the engine's hash function: ``BlockStored`` carries the token
ids of the blocks it stores and the hash of their parent, so each pod's blocks are
kept as a forest keyed by engine hash, and every run of ``block_tokens / block_size``
engine blocks from a kvtier block boundary yields one kvtier key, computed by
:func:`kvtier.core.keys.block_keys` from the previous kvtier key and those tokens.
Equal prompts therefore get equal keys in the router, in the store and in every pod.

Invariants, per pod:

* A kvtier key is credited to the pod exactly when every engine block of its run is
  held (in some medium); its tier is the worst of those blocks' best media, since a
  pod that must load part of a block from CPU serves it at CPU speed.
* Each record remembers the kvtier block it lies in: ``anchor`` (the key before it)
  and ``slot`` (its position in the run). The block closing a run keeps the key it
  closes; the run's first block keeps, in ``covers``, every key closed in runs that
  start with it, and each block counts in ``through`` the keys closed through it.
  A block's keys are then found from its run's first block (a superset, re-derived
  key by key, so exact), at one set per run rather than a list per block: a quarter
  less memory than per-block lists, measured.
* A block removed while keys were closed through it stays as a tombstone (no media,
  tokens kept), so that when the engine stores it again its keys come back; it goes
  when its ``through`` count falls to zero.
* Partial kvtier blocks are never credited (the store keeps no partial block either).
  The cost is at most ``block_tokens - block_size`` tokens of a prefix per prompt;
  the alternative, indexing every 16-token engine block, makes the index 16 times
  larger and its keys unlike the store's, so the shared tier's credit could not be
  added to a pod's.
* Blocks whose hash mixes in more than LoRA and cache salt (multimodal inputs,
  prompt embeddings, speculative lookahead) are not indexed, nor their descendants:
  their token ids alone do not say what they hold, and crediting a pod with a prefix
  it does not have is worse than missing one.

Memory is bounded: past ``max_blocks`` records the least recently stored (or extended)
engine block goes, with the keys that depended on it.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kvtier.core.keys import BlockKey, Namespace, block_keys
from kvtier.router.events import BlockRemoved, BlockStored, EngineHash

__all__ = ["ChainStats", "KeySink", "NamespaceFn", "PodChains"]

NamespaceFn = Callable[[str | None, str], Namespace]
"""(lora name, cache salt) -> the namespace a pod's prompts are keyed in."""


class KeySink(Protocol):
    """Where a pod's credited keys go (the global index, bound to the pod)."""

    def credit(self, key: BlockKey, tier: int) -> None: ...

    def uncredit(self, key: BlockKey) -> None: ...


@dataclass
class ChainStats:
    """What one pod's events did; ``ignored`` counts blocks by reason."""

    stored: int = 0
    removed: int = 0
    evicted: int = 0
    ignored: dict[str, int] = field(default_factory=dict)

    def ignore(self, reason: str, num_blocks: int) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + num_blocks


class _Block:
    """One engine block a pod holds. ``tokens`` only where a later branch may need
    them: a block that closes a kvtier block starts nobody's partial run."""

    __slots__ = (
        "anchor",
        "covers",
        "key",
        "media",
        "parent",
        "slot",
        "through",
        "tokens",
    )

    def __init__(
        self,
        parent: EngineHash | None,
        anchor: BlockKey,
        slot: int,
        tokens: bytes | None,
        media: int,
        key: BlockKey | None,
    ) -> None:
        self.parent = parent
        self.anchor = anchor
        self.slot = slot
        self.tokens = tokens
        self.media = media
        self.key = key
        self.through = 0
        self.covers: set[BlockKey] | None = None  # on a run's first block only


class PodChains:
    """A pod's engine blocks and the kvtier keys they make up.

    Args:
        sink: Receives credits and withdrawals of kvtier keys.
        namespace: Makes the namespace of a chain from its LoRA name and cache salt.
        block_tokens: Tokens per kvtier block.
        media: Tier index of each medium name (upper case), best tier first.
        max_blocks: Most engine blocks kept.
    """

    def __init__(
        self,
        sink: KeySink,
        namespace: NamespaceFn,
        block_tokens: int,
        media: dict[str, int],
        max_blocks: int,
    ) -> None:
        self._sink = sink
        self._namespace = namespace
        self._hasher = namespace(None, "")  # any namespace: its hash and block size
        self._block_tokens = block_tokens
        self._media = media
        self._max_blocks = max_blocks
        self._blocks: dict[EngineHash, _Block] = {}
        self._closers: dict[BlockKey, EngineHash] = {}
        self._tombstones = 0
        self.stats = ChainStats()

    @property
    def num_blocks(self) -> int:
        """Engine blocks held (in some medium)."""
        return len(self._blocks) - self._tombstones

    @property
    def num_keys(self) -> int:
        """kvtier blocks whose last engine block is held (credited or not)."""
        return len(self._closers)

    def stored(self, event: BlockStored) -> None:
        """Applies a ``BlockStored``: new blocks, or known ones in another medium."""
        num = len(event.block_hashes)
        tier = self._tier(event.medium, num)
        if tier is None or not self._shaped(event):
            return
        tokens = _token_bytes(event.token_ids)
        if tokens is None:
            self.stats.ignore("token_ids", num)
            return
        start = self._start(event)
        if start is None:
            self.stats.ignore("unknown_parent", num)
            return
        num = _mappable_prefix(event)
        if num < len(event.block_hashes):
            self.stats.ignore("extra_keys", len(event.block_hashes) - num)
        self._link(event, tokens, start, num, 1 << tier)
        self.stats.stored += num
        self._trim()

    def removed(self, event: BlockRemoved) -> None:
        """Applies a ``BlockRemoved``: the blocks leave ``medium``."""
        tier = self._tier(event.medium, len(event.block_hashes))
        if tier is None:
            return
        if event.group_idx:
            self.stats.ignore("group", len(event.block_hashes))
            return
        bit = 1 << tier
        # Leaves first: a closer goes before the blocks its run passes through, which
        # then have nothing closed through them and go without tombstones. The end
        # state does not depend on the order within one event.
        for engine_hash in reversed(event.block_hashes):
            record = self._blocks.get(engine_hash)
            if record is None or not record.media & bit:
                continue
            self.stats.removed += 1
            record.media &= ~bit
            if record.media:
                self._refresh(self._keys_through(record))
            else:
                self._release(engine_hash, record)

    def clear(self) -> None:
        """Forgets every block (the engine cleared its cache, restarted or expired)."""
        for key in self._closers:
            self._sink.uncredit(key)
        self._blocks.clear()
        self._closers.clear()
        self._tombstones = 0

    def _tier(self, medium: str | None, num: int) -> int | None:
        tier = self._media.get("GPU" if medium is None else medium.upper())
        if tier is None:
            self.stats.ignore("medium", num)
        return tier

    def _shaped(self, event: BlockStored) -> bool:
        num, size = len(event.block_hashes), event.block_size
        if event.group_idx:
            self.stats.ignore("group", num)
        elif size <= 0 or self._block_tokens % size:
            self.stats.ignore("block_size", num)
        elif len(event.token_ids) != num * size:
            self.stats.ignore("token_ids", num)
        else:
            return True
        return False

    def _start(self, event: BlockStored) -> tuple[BlockKey, list[_Block]] | None:
        """The kvtier key before the first new block's run, and that run's earlier
        blocks (oldest first); None when the parent is not known here."""
        if event.parent_block_hash is None:
            salt = _cache_salt(event.extra_keys)
            return self._namespace(event.lora_name, salt).root, []
        parent = self._blocks.get(event.parent_block_hash)
        if parent is None:
            return None
        self._touch(event.parent_block_hash)
        if parent.key is not None:
            return parent.key, []
        run = [parent]
        while run[-1].slot > 0:
            assert run[-1].parent is not None, "a block past slot 0 has a parent"
            earlier = self._blocks.get(run[-1].parent)
            if earlier is None:
                return None
            run.append(earlier)
        run.reverse()
        return run[0].anchor, run

    def _link(
        self,
        event: BlockStored,
        tokens: bytes,
        start: tuple[BlockKey, list[_Block]],
        num: int,
        bit: int,
    ) -> None:
        """Records the first ``num`` blocks of ``event`` and credits the kvtier
        blocks they close. One hash call keys every kvtier block of the event."""
        anchor, run = start
        step = event.block_size * 4
        head = b"".join(r.tokens or b"" for r in run)
        keys = block_keys(
            self._hasher, np.frombuffer(head + tokens[: num * step], "<u4"), anchor
        )
        per_key = self._block_tokens // event.block_size
        parent = event.parent_block_hash
        closed = 0
        for i, engine_hash in enumerate(event.block_hashes[:num]):
            slot = len(run) % per_key
            closes = keys[closed] if slot == per_key - 1 else None
            chunk = None if closes else tokens[i * step : (i + 1) * step]
            record = self._record(engine_hash, parent, anchor, slot, chunk, bit, closes)
            run.append(record)
            if closes is not None:
                self._close(closes, engine_hash, run)
                anchor, run, closed = closes, [], closed + 1
            parent = engine_hash

    def _record(
        self,
        engine_hash: EngineHash,
        parent: EngineHash | None,
        anchor: BlockKey,
        slot: int,
        tokens: bytes | None,
        bit: int,
        closes: BlockKey | None,
    ) -> _Block:
        record = self._blocks.pop(engine_hash, None)
        if record is None:
            record = _Block(parent, anchor, slot, tokens, bit, closes)
        self._blocks[engine_hash] = record  # most recently used last
        if not record.media & bit:
            self._tombstones -= not record.media  # stored again: revived
            record.media |= bit  # or the same block, now also in another medium
            self._refresh(self._keys_through(record))
        return record

    def _close(self, key: BlockKey, closer: EngineHash, run: list[_Block]) -> None:
        self._closers[key] = closer
        head = run[0]
        if head.covers is None:
            head.covers = set()
        if key not in head.covers:
            head.covers.add(key)
            for record in run[:-1]:
                record.through += 1
        if all(r.media for r in run):
            self._sink.credit(key, max(_best(r.media) for r in run))
        else:  # a block of the run was removed; it may be stored again
            self._sink.uncredit(key)

    def _keys_through(self, record: _Block) -> list[BlockKey]:
        """The keys whose runs pass through ``record`` (and others of its run)."""
        keys = [] if record.key is None else [record.key]
        if record.through:
            head: _Block | None = record
            while head is not None and head.slot > 0:
                assert head.parent is not None, "a block past slot 0 has a parent"
                head = self._blocks.get(head.parent)
            if head is not None and head.covers:
                keys.extend(head.covers)
        return keys

    def _refresh(self, keys: Iterable[BlockKey]) -> None:
        """Re-derives whether, and in which tier, the pod holds each key."""
        for key in keys:
            tier = self._run_tier(key)
            if tier is None:
                self._sink.uncredit(key)
            else:
                self._sink.credit(key, tier)

    def _run_tier(self, key: BlockKey) -> int | None:
        closer = self._closers.get(key)
        record = None if closer is None else self._blocks.get(closer)
        worst = 0
        while record is not None and record.media:
            media = record.media
            worst = max(worst, (media & -media).bit_length() - 1)
            if record.slot == 0:
                return worst
            assert record.parent is not None, "a block past slot 0 has a parent"
            record = self._blocks.get(record.parent)
        return None

    def _release(self, engine_hash: EngineHash, record: _Block) -> None:
        """A block no medium holds any more. It goes, with the key it closes, unless
        later blocks closed keys through it: then it stays as a tombstone (no media,
        tokens kept) whose keys come back when the engine stores it again."""
        if record.key is None and record.through:
            self._tombstones += 1
            self._refresh(self._keys_through(record))
        else:
            self._drop(engine_hash, record)

    def _drop(self, engine_hash: EngineHash, record: _Block) -> None:
        keys = self._keys_through(record) if record.through else []
        del self._blocks[engine_hash]
        if record.key is not None and self._closers.get(record.key) == engine_hash:
            del self._closers[record.key]
            self._sink.uncredit(record.key)
            self._forget_cover(record)
        if keys:
            self._refresh(keys)  # evicted from the middle of live runs

    def _forget_cover(self, closer: _Block) -> None:
        """Counts a dropped closer's key out of its run, so that tombstones no key
        needs go and ``covers`` holds only keys that can still be credited."""
        key, record = closer.key, closer
        assert key is not None, "only closers are forgotten"
        while record.slot > 0:
            parent = record.parent
            assert parent is not None, "a block past slot 0 has a parent"
            found = self._blocks.get(parent)
            if found is None:
                return
            record = found
            record.through -= 1
            if record.slot == 0 and record.covers:
                record.covers.discard(key)
            if not record.media and not record.through:  # a tombstone for nothing
                del self._blocks[parent]
                self._tombstones -= 1
        if closer.covers:  # a run of one block: the closer is its own head
            closer.covers.discard(key)

    def _touch(self, engine_hash: EngineHash) -> None:
        self._blocks[engine_hash] = self._blocks.pop(engine_hash)

    def _trim(self) -> None:
        while len(self._blocks) > self._max_blocks:
            engine_hash = next(iter(self._blocks))
            record = self._blocks[engine_hash]
            self._tombstones -= not record.media
            self.stats.evicted += 1
            self._drop(engine_hash, record)


def _best(media: int) -> int:
    """The best (lowest) tier index in a media bitmask."""
    return (media & -media).bit_length() - 1


def _token_bytes(token_ids: list[int]) -> bytes | None:
    try:
        packed = array.array("I", token_ids)
    except (OverflowError, TypeError):
        return None
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return packed.tobytes()


_HARMLESS_EXTRA = ("lora", "cache_salt")


def _mappable_prefix(event: BlockStored) -> int:
    """How many leading blocks hash nothing but tokens, LoRA and cache salt."""
    extra = event.extra_keys
    if not extra:
        return len(event.block_hashes)
    for i, keys in enumerate(extra[: len(event.block_hashes)]):
        if keys and not all(_harmless(item, event.lora_name) for item in keys):
            return i
    return len(event.block_hashes)


def _harmless(item: Any, lora_name: str | None) -> bool:
    if isinstance(item, list | tuple) and item and item[0] in _HARMLESS_EXTRA:
        return True
    return isinstance(item, str) and item == lora_name  # untagged LoRA name


def _cache_salt(extra: list[Any] | None) -> str:
    """vLLM mixes the cache salt into a prompt's first block only."""
    for item in (extra[0] or ()) if extra else ():
        if (
            isinstance(item, list | tuple)
            and len(item) == 2
            and item[0] == "cache_salt"
        ):
            return str(item[1])
    return ""
