"""Replay: exact hits on hand-made traces, the two engines agree, tiers and counts."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from simtraces import chained_traces, key, trace_of

from kvtier.core.policy import POLICIES
from kvtier.errors import ConfigError
from kvtier.sim.replay import (
    ReplayConfig,
    TwoTier,
    finish_points,
    make_engine,
    replay,
)
from kvtier.sim.trace import Request, Trace


def test_lru_exact_hits_and_victims() -> None:
    # cap 3: after "abd" evicts c (least recent once a, b are touched), "abc"
    # finds a, b and evicts d.
    result = replay(trace_of("abc", "abd", "abc", "ab"), ReplayConfig(3, "lru"))
    assert result.request_hits == [0, 2, 2, 2]
    assert result.hit_blocks == 6 and result.num_blocks == 11
    assert result.hit_ratio == pytest.approx(6 / 11)
    assert result.blocks_written == {"memory": 5} and result.evictions == {"memory": 2}


def test_blocks_after_the_first_miss_are_no_hits() -> None:
    # "x" evicts a; then "abc" has b and c stored, but a prefix cache stops at a.
    result = replay(trace_of("abc", "x", "abc"), ReplayConfig(3, "lru"))
    assert result.request_hits == [0, 0, 0]


def test_leaf_first_keeps_the_prefix_lru_loses() -> None:
    trace = trace_of("abc", "x", "abc")
    assert replay(trace, ReplayConfig(3, "leaf_lru")).request_hits == [0, 0, 2]


def test_tokens_count_the_partial_last_block() -> None:
    keys = tuple(key(c) for c in "ab")
    trace = Trace([Request(0.0, keys, 6), Request(1.0, keys, 6)], 4, "t")
    result = replay(trace, ReplayConfig(8, "lru"))
    assert result.hit_tokens == 6 and result.num_tokens == 12
    assert result.token_hit_ratio == 0.5
    partial = Trace([Request(0.0, keys, 6), Request(1.0, keys[:1] + (key("z"),), 7)], 4)
    assert replay(partial, ReplayConfig(8, "lru")).hit_tokens == 4


def test_timeline_windows() -> None:
    result = replay(trace_of("ab", "ab", "ab", gap_s=30.0), ReplayConfig(4, "lru"))
    assert result.timeline == [(4, 2), (2, 2)]
    assert result.ratio_over_time() == [(0.0, 0.5), (60.0, 1.0)]


def test_a_put_never_evicts_its_own_blocks() -> None:
    # 2 blocks of room and a 3-block prompt: the third block finds only the put's
    # own reservations and is not stored. The second request hits a, b and stores c
    # in a's place (touched first, so least recent).
    result = replay(trace_of("abc", "abc"), ReplayConfig(2, "lru"))
    assert result.request_hits == [0, 2]
    assert result.blocks_written == {"memory": 3}
    assert result.evictions == {"memory": 1}


def serve_all(engine: object, trace: Trace) -> list[int]:
    return [engine.serve(r.keys, r.timestamp_s)[0] for r in trace]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(POLICIES))
@settings(max_examples=60, deadline=None)
@given(trace=chained_traces())
def test_policy_alone_and_ledger_agree_at_exact_capacity(
    name: str, trace: Trace
) -> None:
    for capacity in (1, 3, 6):
        config = ReplayConfig(capacity, name, block_bytes=10)
        assert serve_all(make_engine(config), trace) == serve_all(
            TwoTier(config), trace
        )


def test_write_back_writes_disk_only_on_demotion_and_promotes_hits() -> None:
    config = ReplayConfig(2, "lru", disk_capacity_blocks=8, write_policy="write_back")
    result = replay(trace_of("ab", "cd", "ab"), config)
    # "cd" demotes a and b to disk; "ab" then hits both on disk (not in memory) and
    # promotes them, demoting c and d.
    assert result.request_hits == [0, 0, 2]
    assert result.hit_blocks == 2 and result.memory_hit_blocks == 0
    assert result.blocks_written == {"memory": 6, "disk": 4}
    assert result.evictions == {"memory": 4, "disk": 0}


def test_write_behind_writes_every_new_block_to_disk() -> None:
    config = ReplayConfig(2, "lru", disk_capacity_blocks=8, block_bytes=100)
    result = replay(trace_of("ab", "cd", "ab"), config)
    assert result.blocks_written == {"memory": 6, "disk": 4}
    assert result.bytes_written == {"memory": 600, "disk": 400}
    assert result.memory_hit_blocks == 0 and result.hit_blocks == 2


def test_watermarks_evict_in_batches() -> None:
    config = ReplayConfig(10, "lru", high_watermark=0.9, low_watermark=0.5)
    result = replay(trace_of("abcdefghi", "j", "a"), config)
    # j crosses 90% of 10 blocks: down to 5 after it, so a..e go at once.
    assert result.evictions == {"memory": 5}
    assert result.request_hits == [0, 0, 0]


def test_bad_configs_are_named() -> None:
    with pytest.raises(ConfigError, match="policy must be one of"):
        ReplayConfig(10, "mru")
    with pytest.raises(ConfigError, match="capacity_blocks"):
        ReplayConfig(-1)
    with pytest.raises(ValueError, match="watermarks"):
        ReplayConfig(1, high_watermark=0.5, low_watermark=0.9)
    assert dataclasses.replace(ReplayConfig(1), low_watermark=0.5).tiered


def test_finish_points_mark_ended_conversations_and_partial_tails() -> None:
    a, b, c, x, y = (key(n) for n in "abcxy")
    trace = Trace(
        [
            Request(0.0, (a, b), 8),  # "abc" continues it: nothing finished
            Request(1.0, (a, b, c), 10),  # c partial, and nothing continues it: all
            Request(2.0, (x,), 3),  # one partial block, never again: all
            Request(3.0, (a, y), 6),  # y partial; a is not used later: all
        ],
        4,
    )
    assert finish_points(trace) == [2, 0, 0, 0]
    trace.requests.append(Request(4.0, (a,), 4))  # now request 3 goes on: y alone
    assert finish_points(trace) == [2, 0, 0, 1, 0]


def test_hints_keep_the_conversation_that_goes_on() -> None:
    # Room for 4: "cd" needs two victims. Without hints leaf-first LRU takes the
    # oldest, "ab", which comes back; with them, "xy", whose conversation was over.
    trace = trace_of("ab", "xy", "cd", "ab")
    plain = replay(trace, ReplayConfig(4, "hit_density"))
    hinted = replay(trace, ReplayConfig(4, "hit_density", hints=True))
    assert plain.request_hits == [0, 0, 0, 0]
    assert hinted.request_hits == [0, 0, 0, 2]
    tiered = replay(
        trace, ReplayConfig(4, "hit_density", hints=True, low_watermark=0.99)
    )
    assert tiered.request_hits == [0, 0, 0, 2]
