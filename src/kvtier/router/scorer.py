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
from typing import Any, NamedTuple

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


class PodScore(NamedTuple):
    """One pod's answer, with the reasons for it (a NamedTuple: a route makes one per
    pod it answers, and a frozen dataclass costs four times as much to build).

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
    top_k: int | None = None,
) -> list[PodScore]:
    """Scores and ranks ``candidates`` for a prompt, best first.

    Args:
        masks: The index's holders mask of each prompt block, in order.
        num_slots: Pods per mask (the index's slot count).
        num_store_blocks: Leading prompt blocks the shared store holds.
        candidates: The pods to rank (slots below ``num_slots``).
        weights: Tier, store and load weights.
        top_k: Answer only the best ``top_k`` pods (None: all).
    """
    num_blocks = len(masks)
    end = _run_end(masks, num_store_blocks)
    held = _tier_bits(masks[:end], num_slots, candidates, len(weights.tier_weights))
    store = np.where(np.arange(end) < num_store_blocks, weights.store_weight, 0.0)
    store = store[:, None]
    local = np.zeros((end, len(candidates)))
    for weight, bits in zip(weights.tier_weights, held, strict=True):
        local += weight * bits
    credit = np.maximum(local, store)
    alive = np.logical_and.accumulate(credit > 0, axis=0)
    per_tier = [
        (alive & bits & (weight >= store)).sum(axis=0)
        for weight, bits in zip(weights.tier_weights, held, strict=True)
    ]
    runs = alive.sum(axis=0)
    cached = (credit * alive).sum(axis=0) / max(num_blocks, 1)
    return _ranked(candidates, weights, runs, cached, per_tier, top_k)


def _ranked(
    candidates: Sequence[Candidate],
    weights: Weights,
    runs: np.ndarray[Any, Any],
    cached: np.ndarray[Any, Any],
    per_tier: list[np.ndarray[Any, Any]],
    top_k: int | None,
) -> list[PodScore]:
    fractions = cached.tolist()
    scores = [
        f - weights.load_weight * c.load
        for f, c in zip(fractions, candidates, strict=True)
    ]
    order = sorted(
        range(len(candidates)),
        key=lambda i: (-scores[i], candidates[i].load, candidates[i].pod_id),
    )
    runs_list = runs.tolist()
    columns = [n.tolist() for n in per_tier]  # Python ints: no numpy scalar per pod
    ranked = []
    for i in order[:top_k]:
        counts = {
            name: col[i] for name, col in zip(weights.tier_names, columns, strict=True)
        }
        counts["store"] = runs_list[i] - sum(counts.values())
        cand = candidates[i]
        ranked.append(
            PodScore(
                cand.pod_id, scores[i], fractions[i], runs_list[i], counts, cand.load
            )
        )
    return ranked


def _run_end(masks: Sequence[int], num_store_blocks: int) -> int:
    """No run goes past the first block beyond the store's that nobody holds."""
    for j in range(min(num_store_blocks, len(masks)), len(masks)):
        if not masks[j]:
            return j
    return len(masks)


def _tier_bits(
    masks: Sequence[int],
    num_slots: int,
    candidates: Sequence[Candidate],
    num_tiers: int,
) -> list[np.ndarray[Any, Any]]:
    """Per tier, a (blocks x candidates) bool array: the candidate holds the block
    with that tier as its best. The index sets one tier bit per (pod, block)."""
    width = max(1, (num_slots * num_tiers + 7) // 8)
    raw = b"".join([mask.to_bytes(width, "little") for mask in masks])
    flat = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    bits = flat.reshape(len(masks), width * 8).view(bool)
    columns = np.fromiter((c.slot for c in candidates), np.intp, len(candidates))
    return [bits[:, columns * num_tiers + tier] for tier in range(num_tiers)]
