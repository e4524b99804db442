"""Scoring: leading runs weighted by tier and store, load, exact rankings."""

from __future__ import annotations

import pytest

from kvtier.router.scorer import Candidate, Weights, score_pods

WEIGHTS = Weights(("GPU", "CPU"), (1.0, 0.8), store_weight=0.5, load_weight=0.5)
GPU, CPU = 0, 1


def masks(*holdings: dict[int, str]) -> list[int]:
    """One mask per block from {slot: "G" | "C"} (2 tiers per slot)."""
    return [
        sum(1 << (slot * 2 + (GPU if tier == "G" else CPU)) for slot, tier in h.items())
        for h in holdings
    ]


def rank(
    block_masks: list[int],
    candidates: list[Candidate],
    num_store_blocks: int = 0,
    weights: Weights = WEIGHTS,
    num_slots: int = 3,
) -> list[tuple[str, float, int, dict[str, int]]]:
    return [
        (s.pod_id, round(s.score, 6), s.prefix_blocks, s.blocks)
        for s in score_pods(
            block_masks, num_slots, num_store_blocks, candidates, weights
        )
    ]


PODS = [Candidate("a", 0), Candidate("b", 1), Candidate("c", 2)]


def test_gpu_beats_cpu_beats_a_shorter_run() -> None:
    blocks = masks(
        {0: "G", 1: "C", 2: "G"},
        {0: "G", 1: "C", 2: "G"},
        {0: "G", 1: "C"},
        {0: "G", 1: "C"},
    )
    assert rank(blocks, PODS) == [
        ("a", 1.0, 4, {"GPU": 4, "CPU": 0, "store": 0}),
        ("b", 0.8, 4, {"GPU": 0, "CPU": 4, "store": 0}),
        ("c", 0.5, 2, {"GPU": 2, "CPU": 0, "store": 0}),
    ]


def test_a_run_ends_at_the_first_missing_block() -> None:
    blocks = masks({1: "G"}, {0: "G", 1: "G"}, {0: "G", 1: "G"}, {0: "G"})
    assert rank(blocks, PODS) == [
        ("b", 0.75, 3, {"GPU": 3, "CPU": 0, "store": 0}),
        ("a", 0.0, 0, {"GPU": 0, "CPU": 0, "store": 0}),
        ("c", 0.0, 0, {"GPU": 0, "CPU": 0, "store": 0}),
    ]


def test_the_store_extends_every_pods_run_at_its_lower_weight() -> None:
    blocks = masks({0: "G"}, {0: "G", 2: "C"}, {2: "C"}, {0: "G"}, {})
    # the store holds 3 blocks: c gets (0.5 + 0.8 + 0.8) / 5, a (1 + 1 + 0.5 + 1) / 5
    assert rank(blocks, PODS, num_store_blocks=3) == [
        ("a", 0.7, 4, {"GPU": 3, "CPU": 0, "store": 1}),
        ("c", 0.42, 3, {"GPU": 0, "CPU": 2, "store": 1}),
        ("b", 0.3, 3, {"GPU": 0, "CPU": 0, "store": 3}),
    ]


def test_a_store_weighted_above_cpu_wins_those_blocks() -> None:
    weights = Weights(("GPU", "CPU"), (1.0, 0.4), store_weight=0.6, load_weight=0.0)
    blocks = masks({0: "C"}, {0: "C"})
    assert rank(blocks, PODS[:1], num_store_blocks=1, weights=weights) == [
        ("a", 0.5, 2, {"GPU": 0, "CPU": 1, "store": 1})
    ]


def test_load_lowers_the_score() -> None:
    blocks = masks({0: "G", 1: "C", 2: "G"}, {0: "G", 1: "C", 2: "G"})
    pods = [Candidate("a", 0, load=0.5), Candidate("b", 1), Candidate("c", 2, 0.1)]
    assert [(p, s) for p, s, _, _ in rank(blocks, pods)] == [
        ("c", 0.95),
        ("b", 0.8),
        ("a", 0.75),
    ]


def test_equal_pods_rank_by_load_then_id() -> None:
    pods = [Candidate("z", 0), Candidate("y", 1, load=0.0), Candidate("x", 2, 0.2)]
    weights = Weights(("GPU",), (1.0,), store_weight=0.0, load_weight=0.0)
    ranked = rank([0, 0], pods, weights=weights)
    assert [p for p, *_ in ranked] == ["y", "z", "x"]


def test_an_empty_prompt_scores_zero_for_everyone() -> None:
    assert rank([], PODS) == [
        (p, 0.0, 0, {"GPU": 0, "CPU": 0, "store": 0}) for p in ("a", "b", "c")
    ]


def test_hundreds_of_pods_spread_over_many_mask_words() -> None:
    num = 300
    blocks = [
        sum(1 << (slot * 2) for slot in range(num) if slot >= j * 100) for j in range(3)
    ]
    pods = [Candidate(f"p{slot:03}", slot) for slot in range(num)]
    ranked = rank(blocks, pods, num_slots=num)
    assert ranked[0] == ("p200", 1.0, 3, {"GPU": 3, "CPU": 0, "store": 0})
    assert ranked[100][:3] == ("p100", round(2 / 3, 6), 2)
    assert ranked[-1][:3] == ("p099", round(1 / 3, 6), 1)


@pytest.mark.parametrize("num_store_blocks", [0, 2])
def test_reasons_read_like_the_numbers(num_store_blocks: int) -> None:
    blocks = masks({0: "G"}, {0: "C"}, {})
    (best,) = score_pods(
        blocks, 1, num_store_blocks, [Candidate("a", 0, 0.25)], WEIGHTS
    )
    assert best.reason == (
        f"2 leading blocks cached (1 GPU, 1 CPU), load 0.25, score {best.score:.3f}"
    )
