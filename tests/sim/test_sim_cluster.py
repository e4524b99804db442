"""The cluster view: random and prefix-aware routing, the pooled store."""

from __future__ import annotations

import pytest
from simtraces import trace_of

from kvtier.errors import ConfigError
from kvtier.sim.cluster import replay_cluster
from kvtier.sim.replay import ReplayConfig, replay
from kvtier.sim.synth import synthetic_trace


def test_prefix_routing_sends_a_conversation_back_to_its_node() -> None:
    trace = trace_of("ab", "cd", "abe", "cdf", "abeg")
    result = replay_cluster(trace, ReplayConfig(3, "lru"), 2, "prefix")
    # ab and cd land on different nodes (balance), their continuations follow them.
    assert result.request_hits == [0, 0, 2, 2, 3]


def test_pooled_is_one_store_of_the_total_size() -> None:
    trace = trace_of("ab", "cd", "ab", "cd")
    pooled = replay_cluster(trace, ReplayConfig(2, "lru"), 2, "pooled")
    assert pooled.capacity_blocks == 4
    assert pooled.request_hits == replay(trace, ReplayConfig(4, "lru")).request_hits


def test_on_a_chat_trace_prefix_routing_beats_random_and_nears_the_pool() -> None:
    trace = synthetic_trace("chat-fast").head(3000)
    config = ReplayConfig(1000, "lru")
    ratios = {
        routing: replay_cluster(trace, config, 4, routing, seed=1).hit_ratio
        for routing in ("random", "prefix", "pooled")
    }
    assert ratios["random"] < ratios["prefix"] <= ratios["pooled"] * 1.05
    again = replay_cluster(trace, config, 4, "random", seed=1)
    assert again.hit_ratio == ratios["random"]  # seeded


def test_bad_cluster_arguments() -> None:
    trace = trace_of("ab")
    with pytest.raises(ConfigError, match="num_nodes"):
        replay_cluster(trace, ReplayConfig(2), 0, "random")
    with pytest.raises(ConfigError, match="routing"):
        replay_cluster(trace, ReplayConfig(2), 2, "nearest")  # type: ignore[arg-type]
