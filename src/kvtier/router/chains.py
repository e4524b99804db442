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
from typing import Any, Final, Protocol

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


# A record is a plain tuple of atoms, not an object: CPython's cyclic GC untracks such
# tuples, while a full collection over millions of slot objects stops the event loop
# (measured: ~0.4 s per 3M records). Fields, by index:
_PARENT: Final = 0
_ANCHOR: Final = 1
_SLOT: Final = 2
_TOKENS: Final = 3
_MEDIA: Final = 4
_KEY: Final = 5
_THROUGH: Final = 6
_COVERS: Final = 7
Record = tuple[
    EngineHash | None,  # parent: the previous engine block (None: a prompt's first)
    BlockKey,  # anchor: the kvtier key before this block's run
    int,  # slot: position in the run
    bytes | None,  # tokens: only where a later branch may need them
    int,  # media: bitmask of tiers holding it (0: a tombstone)
    BlockKey | None,  # key: the kvtier key this block closes
    int,  # through: keys closed through this block (not counting its own)
    tuple[BlockKey, ...],  # covers: keys closed in runs starting here (slot 0)
]
Run = list[tuple[EngineHash, Record]]


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
        self._blocks: dict[EngineHash, Record] = {}  # least recently used first
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
            if record is None or not record[_MEDIA] & bit:
                continue
            self.stats.removed += 1
            record = self._set(engine_hash, record, _MEDIA, record[_MEDIA] & ~bit)
            if record[_MEDIA]:
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

    def _start(self, event: BlockStored) -> tuple[BlockKey, Run] | None:
        """The kvtier key before the first new block's run, and that run's earlier
        blocks (oldest first); None when the parent is not known here."""
        parent = event.parent_block_hash
        if parent is None:
            salt = _cache_salt(event.extra_keys)
            return self._namespace(event.lora_name, salt).root, []
        record = self._blocks.get(parent)
        if record is None:
            return None
        self._blocks[parent] = self._blocks.pop(parent)  # extended: recently used
        if record[_KEY] is not None:
            return record[_KEY], []
        run = [(parent, record)]
        while record[_SLOT] > 0:
            parent = record[_PARENT]
            assert parent is not None, "a block past slot 0 has a parent"
            found = self._blocks.get(parent)
            if found is None:
                return None
            record = found
            run.append((parent, record))
        run.reverse()
        return run[0][1][_ANCHOR], run

    def _link(
        self,
        event: BlockStored,
        tokens: bytes,
        start: tuple[BlockKey, Run],
        num: int,
        bit: int,
    ) -> None:
        """Records the first ``num`` blocks of ``event`` and credits the kvtier
        blocks they close. One hash call keys every kvtier block of the event."""
        anchor, run = start
        step = event.block_size * 4
        head = b"".join(r[_TOKENS] or b"" for _, r in run)
        keys = block_keys(
            self._hasher, np.frombuffer(head + tokens[: num * step], "<u4"), anchor
        )
        per_key = self._block_tokens // event.block_size
        parent = event.parent_block_hash
        closed = 0
        for i, engine_hash in enumerate(event.block_hashes[:num]):
            slot = len(run)
            closes = keys[closed] if slot == per_key - 1 else None
            chunk = None if closes else tokens[i * step : (i + 1) * step]
            new = (parent, anchor, slot, chunk, bit, closes, 0, ())
            run.append((engine_hash, self._record(engine_hash, new, bit)))
            if closes is not None:
                self._close(closes, run)
                anchor, run, closed = closes, [], closed + 1
            parent = engine_hash

    def _record(self, engine_hash: EngineHash, new: Record, bit: int) -> Record:
        """Stores ``new``, or adds ``bit`` to the record already there."""
        record = self._blocks.pop(engine_hash, None)
        if record is None:
            self._blocks[engine_hash] = new  # most recently used last
            return new
        self._blocks[engine_hash] = record
        if not record[_MEDIA] & bit:
            self._tombstones -= not record[_MEDIA]  # stored again: revived
            record = self._set(engine_hash, record, _MEDIA, record[_MEDIA] | bit)
            self._refresh(self._keys_through(record))
        return record

    def _close(self, key: BlockKey, run: Run) -> None:
        closer, _ = run[-1]
        self._closers[key] = closer
        head_hash, head = run[0]
        if key not in head[_COVERS]:
            self._set(head_hash, head, _COVERS, (*head[_COVERS], key))
            for engine_hash, _ in run[:-1]:
                record = self._blocks[engine_hash]
                self._set(engine_hash, record, _THROUGH, record[_THROUGH] + 1)
        if all(r[_MEDIA] for _, r in run):
            self._sink.credit(key, max(_best(r[_MEDIA]) for _, r in run))
        else:  # a block of the run was removed; it may be stored again
            self._sink.uncredit(key)

    def _set(
        self, engine_hash: EngineHash, record: Record, field: int, value: object
    ) -> Record:
        """The record with one field changed, stored in place (its LRU position
        stays: changing a record is not using it)."""
        changed: Record = (*record[:field], value, *record[field + 1 :])  # type: ignore[assignment]
        self._blocks[engine_hash] = changed
        return changed

    def _keys_through(self, record: Record) -> list[BlockKey]:
        """The keys whose runs pass through ``record`` (and others of its run)."""
        key = record[_KEY]
        keys = [] if key is None else [key]
        if record[_THROUGH]:
            head: Record | None = record
            while head is not None and head[_SLOT] > 0:
                assert head[_PARENT] is not None, "a block past slot 0 has a parent"
                head = self._blocks.get(head[_PARENT])
            if head is not None:
                keys.extend(head[_COVERS])
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
        while record is not None and record[_MEDIA]:
            worst = max(worst, _best(record[_MEDIA]))
            if record[_SLOT] == 0:
                return worst
            assert record[_PARENT] is not None, "a block past slot 0 has a parent"
            record = self._blocks.get(record[_PARENT])
        return None

    def _release(self, engine_hash: EngineHash, record: Record) -> None:
        """A block no medium holds any more. It goes, with the key it closes, unless
        later blocks closed keys through it: then it stays as a tombstone (no media,
        tokens kept) whose keys come back when the engine stores it again."""
        if record[_KEY] is None and record[_THROUGH]:
            self._tombstones += 1
            self._refresh(self._keys_through(record))
        else:
            self._drop(engine_hash, record)

    def _drop(self, engine_hash: EngineHash, record: Record) -> None:
        keys = self._keys_through(record) if record[_THROUGH] else []
        del self._blocks[engine_hash]
        key = record[_KEY]
        if key is not None and self._closers.get(key) == engine_hash:
            del self._closers[key]
            self._sink.uncredit(key)
            self._forget_cover(key, record)
        if keys:
            self._refresh(keys)  # evicted from the middle of live runs

    def _forget_cover(self, key: BlockKey, closer: Record) -> None:
        """Counts a dropped closer's key out of its run, so that tombstones no key
        needs go and ``covers`` holds only keys that can still be credited."""
        record = closer
        while record[_SLOT] > 0:
            parent = record[_PARENT]
            assert parent is not None, "a block past slot 0 has a parent"
            found = self._blocks.get(parent)
            if found is None:
                return
            record = self._set(parent, found, _THROUGH, found[_THROUGH] - 1)
            if record[_SLOT] == 0 and key in record[_COVERS]:
                covers = tuple(k for k in record[_COVERS] if k != key)
                record = self._set(parent, record, _COVERS, covers)
            if not record[_MEDIA] and not record[_THROUGH]:  # a tombstone for nothing
                del self._blocks[parent]
                self._tombstones -= 1

    def _trim(self) -> None:
        while len(self._blocks) > self._max_blocks:
            engine_hash = next(iter(self._blocks))
            record = self._blocks[engine_hash]
            self._tombstones -= not record[_MEDIA]
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
