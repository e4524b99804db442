"""A pod's stream: the verdict on each batch from its number and timestamp."""

from __future__ import annotations

from kvtier.router.feed import Feed, Verdict


def test_batch_zero_applies_and_any_other_first_batch_is_first() -> None:
    assert Feed().classify(0, 1.0) is Verdict.APPLY
    feed = Feed()
    assert feed.classify(7, 1.0) is Verdict.FIRST
    feed.applied(7, 1.0)
    assert feed.classify(8, 1.1) is Verdict.APPLY
    feed.applied(8, 1.1)
    assert feed.expected == 9


def test_a_skipped_number_is_a_gap() -> None:
    feed = Feed()
    feed.applied(3, 1.0)
    assert feed.classify(6, 2.0) is Verdict.GAP


def test_going_back_with_an_older_timestamp_is_a_duplicate() -> None:
    feed = Feed()
    feed.applied(9, 5.0)
    assert feed.classify(9, 5.0) is Verdict.DUPLICATE
    assert feed.classify(4, 3.0) is Verdict.DUPLICATE


def test_going_back_with_a_newer_timestamp_is_a_restart() -> None:
    feed = Feed()
    feed.applied(9, 5.0)
    assert feed.classify(0, 6.0) is Verdict.RESTART


def test_reset_forgets_the_position() -> None:
    feed = Feed()
    feed.applied(9, 5.0)
    feed.reset()
    assert feed.classify(2, 1.0) is Verdict.FIRST and feed.expected is None
