"""Per-tier accounting: which tier holds which block, under which budget and policy.

The ledger keeps four things consistent for every locally indexed tier: the index's tier
bit, the tier's eviction policy, its byte budget and its per-group quotas. Every change
of residency goes through :meth:`Ledger.charge` and :meth:`Ledger.discharge`, so none of
the four can drift from the others. It does no I/O: the store moves the bytes and tells
the ledger; the trace simulator (``kvtier.sim``) drives the very same ledger without
bytes.

Bytes that are promised but not yet resident (a memory slot being filled, a disk write
in flight) are *held*: they count against the budget and quota so concurrent writers see
them, and become a charge or are released when the I/O ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvtier.core.capacity import Budget, QuotaTable
from kvtier.core.index import BlockIndex, BlockMeta, Entry
from kvtier.core.keys import BlockKey
from kvtier.core.policy import EvictionPolicy

__all__ = ["Ledger", "TierAccount"]


@dataclass
class TierAccount:
    """One tier's policy, budget and quotas."""

    policy: EvictionPolicy
    budget: Budget
    quotas: QuotaTable

    @classmethod
    def create(
        cls,
        policy: EvictionPolicy,
        capacity_bytes: int,
        quota_bytes: Mapping[str, int | None] | None = None,
        high_watermark: float = 0.9,
        low_watermark: float = 0.8,
    ) -> TierAccount:
        limits = {g: b for g, b in (quota_bytes or {}).items() if b is not None}
        return cls(
            policy,
            Budget(capacity_bytes, high_watermark, low_watermark),
            QuotaTable(limits, high_watermark, low_watermark),
        )


class Ledger:
    """Residency, budgets and policies of tiers ``0 .. len(accounts) - 1``.

    Not thread-safe: the store calls it under its lock.
    """

    def __init__(self, index: BlockIndex, accounts: list[TierAccount]) -> None:
        self.index = index
        self.accounts = accounts

    def holds(self, tier_id: int, key: BlockKey) -> bool:
        entry = self.index.entry(key)
        return entry is not None and entry.in_tier(tier_id)

    def fits_ever(self, tier_id: int, meta: BlockMeta) -> bool:
        """Whether the block could fit the tier (and its group's quota) when empty."""
        account = self.accounts[tier_id]
        quota = account.quotas.budget(meta.group)
        if not account.budget.can_ever_fit(meta.nbytes):
            return False
        return quota is None or quota.can_ever_fit(meta.nbytes)

    def room_needed(self, tier_id: int, meta: BlockMeta) -> tuple[int, int]:
        """Bytes to evict before holding ``meta``: (from the group, from the tier)."""
        account = self.accounts[tier_id]
        quota = account.quotas.budget(meta.group)
        group_bytes = quota.bytes_to_free(meta.nbytes) if quota is not None else 0
        return group_bytes, account.budget.bytes_to_free(meta.nbytes)

    def has_room(self, tier_id: int, meta: BlockMeta) -> bool:
        """Whether holding ``meta`` keeps the tier and the group within capacity."""
        account = self.accounts[tier_id]
        budget, quota = account.budget, account.quotas.budget(meta.group)
        if budget.used_bytes + meta.nbytes > budget.capacity_bytes:
            return False
        return quota is None or quota.used_bytes + meta.nbytes <= quota.capacity_bytes

    def hold(self, tier_id: int, meta: BlockMeta) -> None:
        """Counts bytes about to become resident."""
        account = self.accounts[tier_id]
        account.budget.add(meta.nbytes)
        account.quotas.add(meta.group, meta.nbytes)

    def unhold(self, tier_id: int, meta: BlockMeta) -> None:
        """Gives back held bytes whose I/O did not happen."""
        account = self.accounts[tier_id]
        account.budget.sub(meta.nbytes)
        account.quotas.sub(meta.group, meta.nbytes)

    def charge(
        self, tier_id: int, key: BlockKey, meta: BlockMeta, now: float, *, held: bool
    ) -> Entry:
        """Records ``key`` as resident (its bytes already held if ``held``)."""
        if not held:
            self.hold(tier_id, meta)
        entry = self.index.add(key, meta, tier_id)
        self.accounts[tier_id].policy.insert(key, meta.nbytes, meta.parent, now)
        return entry

    def load(
        self, tier_id: int, blocks: Iterable[tuple[BlockKey, BlockMeta]], now: float
    ) -> int:
        """Charges blocks a tier already holds (a reopened disk), in their order.

        The budget and quotas are charged once per group rather than per block, which
        keeps reopening a tier of 100,000 blocks well under a second of ledger work.
        """
        group_totals: dict[str, tuple[int, int]] = {}
        loaded: list[tuple[BlockKey, int, BlockKey | None]] = []
        for key, meta in blocks:
            self.index.add(key, meta, tier_id)
            loaded.append((key, meta.nbytes, meta.parent))
            nbytes, blocks_in_group = group_totals.get(meta.group, (0, 0))
            group_totals[meta.group] = (nbytes + meta.nbytes, blocks_in_group + 1)
        account = self.accounts[tier_id]
        account.policy.load(loaded, now)
        for group, (nbytes, num_blocks) in group_totals.items():
            account.budget.add(nbytes)
            account.quotas.add(group, nbytes, num_blocks)
        return len(loaded)

    def discharge(self, tier_id: int, key: BlockKey) -> bool:
        """Records that the tier no longer holds ``key``; False if it did not."""
        entry = self.index.entry(key)
        if entry is None or not entry.in_tier(tier_id):
            return False
        self.accounts[tier_id].policy.remove(key)
        self.unhold(tier_id, entry.meta)
        self.index.drop_tier(key, tier_id)
        return True

    def touch(self, key: BlockKey, now: float) -> bool:
        """A hit: every tier holding ``key`` hears of it. False if it is not stored."""
        entry = self.index.get(key, now)
        if entry is None:
            return False
        for tier_id, account in enumerate(self.accounts):
            if entry.in_tier(tier_id):
                account.policy.touch(key, now)
        return True

    def finish(self, keys: Sequence[BlockKey], now: float) -> None:
        """An engine's hint that a prompt is finished: every tier's policy hears it
        (see :meth:`EvictionPolicy.finish`)."""
        for account in self.accounts:
            account.policy.finish(keys, now)

    def victims(
        self, tier_id: int, nbytes: int, now: float, group: str | None = None
    ) -> list[BlockKey]:
        """Blocks to evict from a tier to free ``nbytes`` (of ``group`` only, if given).

        Leased blocks are never chosen. The victims leave the policy at once; the
        caller moves their bytes and then calls :meth:`discharge` for each.
        """

        def can_evict(key: BlockKey) -> bool:
            entry = self.index.entry(key)
            if entry is None:
                return True
            if entry.is_leased(now):
                return False
            return group is None or entry.meta.group == group

        return self.accounts[tier_id].policy.evict_bytes(nbytes, now, can_evict)

    def usage(self) -> list[dict[str, int]]:
        """Per tier, bytes held per group."""
        return [account.quotas.usage() for account in self.accounts]

    def items(self) -> list[dict[str, int]]:
        """Per tier, blocks held per group."""
        return [account.quotas.items() for account in self.accounts]
