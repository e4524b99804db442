"""Eviction policies: which block a full tier gives up next.

Every policy implements :class:`EvictionPolicy` (the interface, and why there is only
one, is in :mod:`kvtier.core.policy.base`); each lives in a module of its own:

* ``lru`` (:class:`LRUPolicy`, ``lru.py``): least recently inserted or touched first.
  O(1).
* ``weighted_lru`` (:class:`WeightedLRUPolicy`, ``weighted.py``): lowest "keep score"
  first, a weighted blend of recency, hit count and size (llm-d's weights 0.2 / 0.5 /
  0.3). O(n) per eviction call, amortized over a batch by ``evict_bytes``.
* ``leaf_lru`` (:class:`LeafFirstLRUPolicy`, ``leaf.py``): LRU among blocks no other
  tracked block names as its parent, so a prompt's prefix outlives its suffix and
  every stored block stays reachable by a prefix match. O(log n).
* ``s3fifo`` (:class:`S3FIFOPolicy`, ``s3fifo.py``): S3-FIFO (Yang et al., SOSP'23): a
  small FIFO that filters one-hit wonders, a main FIFO with lazy reinsertion, a ghost
  FIFO of keys recently evicted from small. O(1) amortized.
* ``arc`` (:class:`ARCPolicy`, ``arc.py``): ARC (Megiddo and Modha, FAST'03): recency
  and frequency lists balanced by ghost hits. O(1) amortized.
* ``lfu`` (:class:`LFUPolicy`, ``lfu.py``): least frequently used with dynamic aging
  (LFU-DA). O(log n).
* ``hit_density`` (:class:`HitDensityPolicy`, ``density.py``), the default: leaf-first,
  classed by conversation turns, ranked by expected hits per second of residence as
  learned online from reuse ages. O(log n).

A new policy is a module beside these with a subclass of
:class:`~kvtier.core.policy.base.TrackingPolicy` (or of
:class:`~kvtier.core.policy.base.LeafFirstPolicy`, which keeps the child counts of the
leaf-first ones), a line in :data:`POLICIES` below (its ``name`` is what config files
say) and an item in the list above. ``kvtier replay`` then measures it against the
others and Belady's MIN (``docs/replay.md``).
"""

from __future__ import annotations

import inspect
from typing import Any

from kvtier.core.policy.arc import ARCPolicy
from kvtier.core.policy.base import CanEvict, EvictionPolicy
from kvtier.core.policy.density import HitDensityPolicy
from kvtier.core.policy.leaf import LeafFirstLRUPolicy
from kvtier.core.policy.lfu import LFUPolicy
from kvtier.core.policy.lru import LRUPolicy
from kvtier.core.policy.s3fifo import S3FIFOPolicy
from kvtier.core.policy.weighted import WeightedLRUPolicy
from kvtier.errors import ConfigError

__all__ = [
    "POLICIES",
    "ARCPolicy",
    "CanEvict",
    "EvictionPolicy",
    "HitDensityPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "LeafFirstLRUPolicy",
    "S3FIFOPolicy",
    "WeightedLRUPolicy",
    "make_policy",
]

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (
        LRUPolicy,
        WeightedLRUPolicy,
        LeafFirstLRUPolicy,
        S3FIFOPolicy,
        ARCPolicy,
        LFUPolicy,
        HitDensityPolicy,
    )
}
"""Policy name (as in config files) -> class."""


def make_policy(name: str, **options: Any) -> EvictionPolicy:
    """Builds the policy named ``name`` with its constructor ``options``.

    Args:
        name: One of the keys of :data:`POLICIES`.
        **options: Keyword arguments of that policy's constructor.

    Raises:
        ConfigError: ``name`` is unknown, an option does not exist for that policy, or
            an option's value is out of range.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"policy must be one of {list(POLICIES)}, got {name!r}")
    allowed = list(inspect.signature(cls).parameters)
    for option in options:
        if option not in allowed:
            raise ConfigError(
                f"policy {name!r} has no option {option!r}; allowed: {allowed}"
            )
    try:
        return cls(**options)
    except TypeError as exc:  # a value of the wrong type, e.g. a str weight
        raise ConfigError(f"bad option value for policy {name!r}: {exc}") from exc
