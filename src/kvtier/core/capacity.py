"""Byte budgets per tier and per quota group, with high / low watermarks.

Eviction is batched: nothing is evicted while usage stays under the high watermark
(default 90% of capacity); once an insert would cross it, enough is evicted to bring
usage down to the low watermark (default 80%). Evicting in batches keeps the policy's
work off most puts and leaves headroom so a burst of puts does not evict one block per
put (Mooncake users' complaint: puts failing while eviction lags behind).

A quota group (a tenant or instance group) may have its own byte limit per tier; the
same watermarks apply inside the group, and only the group's own blocks are evicted for
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Budget", "QuotaTable"]


@dataclass
class Budget:
    """A byte budget with watermarks. Not thread-safe: the store locks it.

    Attributes:
        capacity_bytes: The most bytes the budget may hold.
        high_watermark: Fraction of capacity at which eviction starts.
        low_watermark: Fraction of capacity eviction frees down to.
        used_bytes: Bytes held now.
    """

    capacity_bytes: int
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    used_bytes: int = 0

    def __post_init__(self) -> None:
        if self.capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {self.capacity_bytes}")
        if not 0.0 < self.low_watermark <= self.high_watermark <= 1.0:
            raise ValueError(
                "watermarks must satisfy 0 < low <= high <= 1, got "
                f"low={self.low_watermark} high={self.high_watermark}"
            )

    @property
    def utilization(self) -> float:
        """Used bytes as a fraction of capacity (0.0 for an empty budget)."""
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0

    def can_ever_fit(self, nbytes: int) -> bool:
        """Whether ``nbytes`` could fit even in an empty budget."""
        return nbytes <= self.capacity_bytes

    def bytes_to_free(self, incoming_bytes: int) -> int:
        """Bytes to evict before adding ``incoming_bytes``: 0 while under the high mark.

        Once crossing it, enough to land at the low watermark after the insert.
        """
        after = self.used_bytes + incoming_bytes
        if after <= self.capacity_bytes * self.high_watermark:
            return 0
        target = int(self.capacity_bytes * self.low_watermark)
        return max(after - target, after - self.capacity_bytes, 0)

    def add(self, nbytes: int) -> None:
        self.used_bytes += nbytes

    def sub(self, nbytes: int) -> None:
        self.used_bytes -= nbytes
        assert self.used_bytes >= 0, "budget usage went negative"


@dataclass
class QuotaTable:
    """Per-group usage of one tier, and budgets for the groups that have a quota.

    Usage (bytes and blocks) is kept for every group, quota or not, so operators see
    each tenant's share; only groups with a quota are ever limited.
    """

    limits: Mapping[str, int] = field(default_factory=dict)
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    _budgets: dict[str, Budget] = field(default_factory=dict, init=False)
    _usage: dict[str, list[int]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for group, limit in self.limits.items():
            self._budgets[group] = Budget(
                limit, self.high_watermark, self.low_watermark
            )

    def budget(self, group: str) -> Budget | None:
        """The group's budget, or ``None`` if it has no quota on this tier."""
        return self._budgets.get(group)

    def set_limit(self, group: str, limit: int | None) -> None:
        """Sets, changes or (``None``) lifts a group's quota, keeping its usage."""
        if limit is None:
            self._budgets.pop(group, None)
            return
        used = self._usage.get(group, [0, 0])[0]
        self._budgets[group] = Budget(
            limit, self.high_watermark, self.low_watermark, used_bytes=used
        )

    def usage(self) -> dict[str, int]:
        """Bytes held per group."""
        return {group: used[0] for group, used in self._usage.items() if used[1]}

    def items(self) -> dict[str, int]:
        """Blocks held per group."""
        return {group: used[1] for group, used in self._usage.items() if used[1]}

    def add(self, group: str, nbytes: int, count: int = 1) -> None:
        used = self._usage.setdefault(group, [0, 0])
        used[0] += nbytes
        used[1] += count
        budget = self._budgets.get(group)
        if budget is not None:
            budget.add(nbytes)

    def sub(self, group: str, nbytes: int, count: int = 1) -> None:
        used = self._usage[group]
        used[0] -= nbytes
        used[1] -= count
        budget = self._budgets.get(group)
        if budget is not None:
            budget.sub(nbytes)
