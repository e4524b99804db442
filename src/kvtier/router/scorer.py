"""Which pod should take a prompt: its cached prefix, weighted by tier, less its load.

For each candidate pod, walk the prompt's blocks in order; block ``j`` is available
to the pod when the pod holds it (credit: the weight of its tier, GPU 1.0, CPU 0.8
by default) or when the shared kvtier store holds the first ``num_store_blocks``
blocks and ``j`` is among them (credit: ``store_weight``; any pod can load it). A
block both offer earns the larger credit. The pod's run ends at its first block
available neither way, since an engine reuses a prefix only up to its first miss.

    cached_fraction = sum of credits over the run / number of prompt blocks
    score           = cached_fraction - load_weight * load

Pods rank by score, then lower load, then id, so equal pods are picked the same way
every time. The work is numpy over a (blocks x pods x tiers) bit array unpacked from
the index's masks, so its cost hardly depends on how many pods hold the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Candidate", "PodScore", "Weights", "score_pods"]


@dataclass(frozen=True)
class Weights:
    """How blocks and load count.

    Attributes:
        tier_names: Name of each tier, best first (index = tier id in the masks).
        tier_weights: Credit of a block held in each tier.
        store_weight: Credit of a block only the shared store holds.
        load_weight: How much load lowers a score.
    """

    tier_names: tuple[str, ...]
    tier_weights: tuple[float, ...]
    store_weight: float
    load_weight: float


@dataclass(frozen=True)
class Candidate:
    """A pod that may take the prompt."""

    pod_id: str
    slot: int
    load: float = 0.0


@dataclass(frozen=True)
class PodScore:
    """One pod's answer, with the reasons for it.

    Attributes:
        pod_id: The pod.
        score: ``cached_fraction - load_weight * load``; higher is better.
        cached_fraction: Credited blocks of the prompt's run, over all its blocks.
        prefix_blocks: Leading blocks available to the pod (held or in the store).
        blocks: Of those, how many come from each tier and from "store".
        load: The load the pod last reported.
    """

    pod_id: str
    score: float
    cached_fraction: float
    prefix_blocks: int
    blocks: dict[str, int]
    load: float

    @property
    def reason(self) -> str:
        """One line a person reads: where the prefix is, and the load."""
        parts = ", ".join(f"{n} {tier}" for tier, n in self.blocks.items() if n)
        where = f" ({parts})" if parts else ""
        return (
            f"{self.prefix_blocks} leading blocks cached{where}, "
            f"load {self.load:.2f}, score {self.score:.3f}"
        )


def score_pods(
    masks: Sequence[int],
    num_slots: int,
    num_store_blocks: int,
    candidates: Sequence[Candidate],
    weights: Weights,
) -> list[PodScore]:
    """Scores and ranks ``candidates`` for a prompt, best first.

    Args:
        masks: The index's holders mask of each prompt block, in order.
        num_slots: Pods per mask (the index's slot count).
        num_store_blocks: Leading prompt blocks the shared store holds.
        candidates: The pods to rank (slots below ``num_slots``).
        weights: Tier, store and load weights.
    """
    num_blocks = len(masks)
    end = _run_end(masks, num_store_blocks)
    local, best = _holdings(masks[:end], num_slots, candidates, weights)
    store = np.where(np.arange(end) < num_store_blocks, weights.store_weight, 0.0)
    credit = np.maximum(local, store[:, None])
    alive = np.logical_and.accumulate(credit > 0, axis=0)
    from_tier = alive & (local >= store[:, None]) & (local > 0)
    runs = alive.sum(axis=0)
    cached = (credit * alive).sum(axis=0) / max(num_blocks, 1)
    names = weights.tier_names
    per_tier = [(from_tier & (best == t)).sum(axis=0) for t in range(len(names))]
    scores = []
    for i, cand in enumerate(candidates):
        counts = {name: int(per_tier[t][i]) for t, name in enumerate(names)}
        counts["store"] = int(runs[i]) - sum(counts.values())
        scores.append(
            PodScore(
                cand.pod_id,
                float(cached[i]) - weights.load_weight * cand.load,
                float(cached[i]),
                int(runs[i]),
                counts,
                cand.load,
            )
        )
    scores.sort(key=lambda s: (-s.score, s.load, s.pod_id))
    return scores


def _run_end(masks: Sequence[int], num_store_blocks: int) -> int:
    """No run goes past the first block beyond the store's that nobody holds."""
    for j in range(min(num_store_blocks, len(masks)), len(masks)):
        if not masks[j]:
            return j
    return len(masks)


def _holdings(
    masks: Sequence[int],
    num_slots: int,
    candidates: Sequence[Candidate],
    weights: Weights,
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(blocks x candidates) credit of each candidate's own copy (0: none), and the
    best tier it holds each block in."""
    num_tiers = len(weights.tier_weights)
    width = max(1, (num_slots * num_tiers + 7) // 8)
    raw = b"".join(m.to_bytes(width, "little") for m in masks)
    flat = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    bits = flat.reshape(len(masks), width * 8)[:, : num_slots * num_tiers].reshape(
        len(masks), num_slots, num_tiers
    )[:, [c.slot for c in candidates], :]
    held = bits.any(axis=2)
    best = bits.argmax(axis=2)
    tier_weights = np.asarray(weights.tier_weights)
    return np.where(held, tier_weights[best], 0.0), best
