"""The eviction policy interface, and the victim loop the policies share.

Every policy implements one interface, :class:`EvictionPolicy`. A tier tells it what it
holds (``insert``), what was read (``touch``) and what left for another reason
(``remove``); when it needs room it asks for victims (``evict`` / ``evict_bytes``),
passing a ``can_evict`` predicate that vetoes blocks a reader has leased or a writer
has not finished. A policy holds no bytes, does no I/O and reads no clock: time comes
in as ``now``. There is one interface because two callers run the same code: the
store, and the trace simulator that replays millions of requests to compare policies
offline. A policy that behaved differently in the two would make the simulator's
numbers meaningless.

The policies in this package build on :class:`TrackingPolicy`: it keeps their table of
entries and byte total, and runs both ``evict`` and ``evict_bytes`` off one generator
of victims that each policy writes, so a policy's skip-and-restore logic for vetoed
keys is written once. A policy that keeps other state may subclass
:class:`EvictionPolicy` directly; its ``evict_bytes`` then loops over ``evict``.

None of them is thread-safe: the tier that owns one locks it. ``can_evict`` must not
call back into the policy.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import ClassVar, Generic, Protocol, TypeVar

from kvtier.core.keys import BlockKey

__all__ = [
    "CanEvict",
    "EvictionPolicy",
    "LeafFirstPolicy",
    "TrackingPolicy",
    "Victims",
    "add_child",
    "check_nbytes",
    "drop_child",
    "put_back_at_head",
]

CanEvict = Callable[[BlockKey], bool]
"""Whether a block may be evicted now (``False``: leased by a reader, mid-write)."""

Victims = Generator[tuple[BlockKey, int], None, None]
"""Victims as (key, nbytes) in eviction order: see :meth:`TrackingPolicy._victims`."""

EntryT = TypeVar("EntryT")
ValueT = TypeVar("ValueT")


class _ChainEntry(Protocol):
    nbytes: int
    parent: BlockKey | None


ChainEntryT = TypeVar("ChainEntryT", bound=_ChainEntry)


class EvictionPolicy(abc.ABC):
    """Chooses eviction victims among the blocks one tier holds."""

    __slots__ = ()
    name: ClassVar[str]

    @abc.abstractmethod
    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        """Records that the tier now holds ``key``.

        Inserting a key already present counts as a touch and updates its size.

        Args:
            key: The block's key.
            nbytes: The block's size in bytes, as the tier stores it.
            parent: The previous block of its prompt's key chain, or ``None``.
            now: The current time in seconds.

        Raises:
            ValueError: ``nbytes`` is negative.
        """

    def load(
        self, blocks: Iterable[tuple[BlockKey, int, BlockKey | None]], now: float
    ) -> None:
        """Records blocks the tier already held when it opened, oldest first: the
        same as inserting them in that order. Policies with a faster bulk path (one
        heap build instead of a push per block) override it.

        Args:
            blocks: ``(key, nbytes, parent)`` per block.
            now: The current time in seconds.
        """
        for key, nbytes, parent in blocks:
            self.insert(key, nbytes, parent, now)

    @abc.abstractmethod
    def touch(self, key: BlockKey, now: float) -> None:
        """Records a hit on ``key``. No-op if absent."""

    @abc.abstractmethod
    def remove(self, key: BlockKey) -> None:
        """Forgets ``key``, which left the tier for a reason other than eviction.

        No-op if absent. Not an eviction: no policy learns from it (S3-FIFO's ghost
        queue records evictions only).
        """

    def finish(self, keys: Sequence[BlockKey], now: float) -> None:
        """A hint from the engine: nothing will ask for the end of this prompt again.

        ``keys`` are a prompt's keys in order. The engine (or the application behind
        it) knows two such things that the cache cannot see: a conversation that is
        over (a chat closed, an agent done), whose whole prompt is then finished; and
        a partial last block, which no later prompt can match as it is (the next turn
        extends it into a different block), then finished alone. Policies that use
        hints let the finished blocks that no other prompt shares go first; the others
        ignore them (this default does nothing). A finished block that is used again
        after all stops being finished.

        Args:
            keys: The finished prompt's keys (or its last block's), in prompt order.
            now: The current time in seconds.
        """
        return  # most policies take no hints

    @abc.abstractmethod
    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        """Chooses the next victim, forgets it and returns it.

        Args:
            now: The current time in seconds.
            can_evict: Vetoes keys that must stay (they are skipped and keep their
                place); ``None`` allows every key.

        Returns:
            The victim, or ``None`` when no tracked key may be evicted.
        """

    def evict_bytes(
        self, nbytes: int, now: float, can_evict: CanEvict | None = None
    ) -> list[BlockKey]:
        """Evicts victims, in order, until at least ``nbytes`` bytes are freed.

        Args:
            nbytes: Bytes to free; nothing is evicted when it is zero or less.
            now: The current time in seconds.
            can_evict: As for :meth:`evict`.

        Returns:
            The victims in eviction order; they free less than ``nbytes`` only when
            nothing else may be evicted.
        """
        victims: list[BlockKey] = []
        freed_bytes = 0
        while freed_bytes < nbytes:
            before_bytes = self.total_bytes
            key = self.evict(now, can_evict)
            if key is None:
                break
            victims.append(key)
            freed_bytes += before_bytes - self.total_bytes
        return victims

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of tracked keys."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked."""

    @property
    @abc.abstractmethod
    def total_bytes(self) -> int:
        """The sum of ``nbytes`` over tracked keys."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} keys, {self.total_bytes} bytes)"


class TrackingPolicy(EvictionPolicy, Generic[EntryT]):
    """A policy with one entry per tracked key and its victims as a generator.

    A subclass keeps ``_entries`` (tracked key -> its entry) and ``_total_bytes`` (the
    sum of the tracked sizes) current and writes :meth:`_victims`; this class answers
    ``len``, ``in`` and ``total_bytes`` from the two and evicts off the generator.

    Args:
        entries: The empty table, of the dict type the subclass needs.
    """

    __slots__ = ("_entries", "_total_bytes")

    def __init__(self, entries: dict[BlockKey, EntryT]) -> None:
        self._entries = entries
        self._total_bytes = 0

    @abc.abstractmethod
    def _victims(self, can_evict: CanEvict | None) -> Victims:
        """Yields victims in eviction order, skipping the keys ``can_evict`` vetoes.

        Each victim is forgotten (its bytes off ``_total_bytes``) before it is
        yielded. Closing the generator, after any victim or none, must put every key
        it skipped back where it was: that is how ``evict`` and ``evict_bytes`` share
        one skip-and-restore logic per policy.
        """

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        victims = self._victims(can_evict)
        try:
            victim = next(victims, None)
        finally:
            victims.close()
        return None if victim is None else victim[0]

    def evict_bytes(
        self, nbytes: int, now: float, can_evict: CanEvict | None = None
    ) -> list[BlockKey]:
        # One pass for the batch: the default loop would re-ask can_evict about every
        # leased key at the head once per victim (and weighted_lru would re-rank every
        # key per victim).
        victims = self._victims(can_evict)
        keys: list[BlockKey] = []
        freed_bytes = 0
        try:
            if nbytes <= 0:
                return keys
            for key, key_bytes in victims:
                keys.append(key)
                freed_bytes += key_bytes
                if freed_bytes >= nbytes:
                    break
        finally:
            victims.close()
        return keys

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def total_bytes(self) -> int:
        return self._total_bytes


class LeafFirstPolicy(TrackingPolicy[ChainEntryT]):
    """A policy whose candidates are leaves: keys no tracked key names as parent.

    Evicting a prefix block would strand its stored descendants (a prefix match stops
    at the first missing block), so leaf-first policies only ever evict leaves. This
    class keeps the child counts (for every parent key, tracked or not, so a parent
    inserted after its children is a non-leaf at once) and forgets keys; a subclass
    queues its leaves and is told through :meth:`_requeue` when a key becomes a leaf
    again.
    """

    __slots__ = ("_num_children",)

    def __init__(self, entries: dict[BlockKey, ChainEntryT]) -> None:
        super().__init__(entries)
        # parent key -> number of tracked keys naming it; absent means 0.
        self._num_children: dict[BlockKey, int] = {}

    def _link(self, key: BlockKey, entry: ChainEntryT, parent: BlockKey | None) -> None:
        """Gives ``entry`` the ``parent`` its insert names, if it has none yet.

        A key's parent is fixed by its first insert that names one: keys are chain
        hashes, so the same key always has the same prefix. A key naming itself as its
        parent is taken to have none. Cycles of two or more keys cannot come from real
        key chains; their members are never leaves and so are never evicted.
        """
        if entry.parent is None and parent is not None and parent != key:
            entry.parent = parent
            add_child(self._num_children, parent)

    def remove(self, key: BlockKey) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._forget(key, entry)  # its queue items, if any, turn stale
            self._maybe_rebuild()

    def _forget(self, key: BlockKey, entry: ChainEntryT) -> None:
        del self._entries[key]
        self._total_bytes -= entry.nbytes
        parent = entry.parent
        if parent is None or not drop_child(self._num_children, parent):
            return
        parent_entry = self._entries.get(parent)
        if parent_entry is not None:  # a leaf again, at its own last access
            self._requeue(parent, parent_entry)

    @abc.abstractmethod
    def _requeue(self, key: BlockKey, entry: ChainEntryT) -> None:
        """Queues ``key``, which just lost its last tracked child."""

    @abc.abstractmethod
    def _maybe_rebuild(self) -> None:
        """Compacts the leaf queues when stale items pile up (never during eviction)."""


def check_nbytes(nbytes: int) -> None:
    """Raises ``ValueError`` unless ``nbytes`` is a valid block size (>= 0)."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be non-negative, got {nbytes}")


def put_back_at_head(
    queue: OrderedDict[BlockKey, ValueT], skipped: list[tuple[BlockKey, ValueT]]
) -> None:
    """Returns the items a victim loop popped off ``queue``'s head, in their order.

    A vetoed key is popped rather than stepped over because the loop's own pops of
    victims would break an iterator over ``queue``; putting it back at the head, not
    the tail, keeps its place: a veto is not an access.
    """
    for key, value in reversed(skipped):
        queue[key] = value
        queue.move_to_end(key, last=False)


def add_child(num_children: dict[BlockKey, int], parent: BlockKey) -> None:
    """Counts one more tracked key naming ``parent`` (tracked or not) as its parent.

    The leaf-first policies keep these counts for every parent key, so a parent
    inserted after its children is known at once not to be a leaf.
    """
    num_children[parent] = num_children.get(parent, 0) + 1


def drop_child(num_children: dict[BlockKey, int], parent: BlockKey) -> bool:
    """Counts one child of ``parent`` less; True when it just lost its last one."""
    num_left = num_children[parent] - 1
    if num_left:
        num_children[parent] = num_left
        return False
    del num_children[parent]
    return True
