"""The global index: kvtier block key -> the pods holding it, and in which tier.

A key is 16 bytes of a namespaced chain (model, layout, tenant, LoRA, salt are in it),
so one dict keyed by block key is the (model, block key) index. Its value is one
Python int, a bitmask with ``num_tiers`` bits per pod: bit ``slot * num_tiers + t`` is
set when the pod in ``slot`` holds the block with tier ``t`` as its best. One int per
key keeps the index small (no per-key containers) and lets the scorer turn the masks
of a whole prompt into a (blocks x pods x tiers) bit array in one numpy call.

Pods get small slot numbers; a removed pod's slot is reused by the next pod added,
after all its keys were withdrawn.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.core.keys import BlockKey

__all__ = ["GlobalIndex", "SlotSink"]


class GlobalIndex:
    """Block key -> holders bitmask, and the pod slots.

    Args:
        num_tiers: Tiers per pod (bits per pod in a mask).
    """

    def __init__(self, num_tiers: int) -> None:
        assert 1 <= num_tiers <= 8, "one to eight tiers"
        self.num_tiers = num_tiers
        self._all_tiers = (1 << num_tiers) - 1
        self._holders: dict[BlockKey, int] = {}
        self._slots_used: set[int] = set()

    @property
    def num_keys(self) -> int:
        """Distinct keys some pod holds."""
        return len(self._holders)

    def num_entries(self) -> int:
        """(pod, key) pairs held, counted over every key: O(keys), for reports."""
        return sum(mask.bit_count() for mask in self._holders.values())

    @property
    def num_slots(self) -> int:
        """One past the highest slot in use (the width of a mask, in pods)."""
        return max(self._slots_used, default=-1) + 1

    def add_slot(self) -> int:
        """Reserves the lowest free pod slot."""
        slot = next(
            i for i in range(len(self._slots_used) + 1) if i not in self._slots_used
        )
        self._slots_used.add(slot)
        return slot

    def remove_slot(self, slot: int) -> None:
        """Frees a slot whose keys were all withdrawn."""
        self._slots_used.discard(slot)

    def credit(self, slot: int, key: BlockKey, tier: int) -> None:
        """The pod in ``slot`` holds ``key``, at best in ``tier``."""
        shift = slot * self.num_tiers
        mask = self._holders.get(key, 0) & ~(self._all_tiers << shift)
        self._holders[key] = mask | (1 << (shift + tier))

    def uncredit(self, slot: int, key: BlockKey) -> None:
        """The pod in ``slot`` no longer holds ``key``."""
        mask = self._holders.get(key)
        if mask is None:
            return
        mask &= ~(self._all_tiers << (slot * self.num_tiers))
        if mask:
            self._holders[key] = mask
        else:
            del self._holders[key]

    def masks(self, keys: Sequence[BlockKey]) -> list[int]:
        """The holders mask of each key (0: nobody)."""
        get = self._holders.get
        return [get(key, 0) for key in keys]

    def holders(self, key: BlockKey) -> dict[int, int]:
        """Slot -> best tier of every pod holding ``key``."""
        mask, found = self._holders.get(key, 0), {}
        for slot in range(self.num_slots):
            bits = mask >> (slot * self.num_tiers) & self._all_tiers
            if bits:
                found[slot] = (bits & -bits).bit_length() - 1
        return found


class SlotSink:
    """A :class:`GlobalIndex` bound to one pod's slot (a chain's key sink)."""

    __slots__ = ("_index", "slot")

    def __init__(self, index: GlobalIndex, slot: int) -> None:
        self._index = index
        self.slot = slot

    def credit(self, key: BlockKey, tier: int) -> None:
        self._index.credit(self.slot, key, tier)

    def uncredit(self, key: BlockKey) -> None:
        self._index.uncredit(self.slot, key)
