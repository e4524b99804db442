"""The ``router`` configuration section: file, environment, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import RouterModelConfig, RouterPodConfig, load_config
from kvtier.errors import ConfigError


def test_pods_and_models_from_a_file_and_weights_from_the_environment(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kvtier.yaml"
    path.write_text(
        "router:\n"
        "  listen: 0.0.0.0:9000\n"
        "  pods:\n"
        "    a: {model: llama, endpoint: 'tcp://10.0.0.1:5557',\n"
        "        replay_endpoint: 'tcp://10.0.0.1:5558'}\n"
        "  models:\n"
        "    llama: {layout_id: L32, tp_size: 2}\n"
    )
    env = {"KVTIER_ROUTER_TIER_WEIGHTS": "{GPU: 1.0, CPU: 0.6, STORAGE: 0.3}"}
    router = load_config(path, env=env).router
    assert router.listen == "0.0.0.0:9000"
    assert router.pods == {
        "a": RouterPodConfig(
            model="llama",
            endpoint="tcp://10.0.0.1:5557",
            replay_endpoint="tcp://10.0.0.1:5558",
        )
    }
    assert router.models == {"llama": RouterModelConfig(layout_id="L32", tp_size=2)}
    assert router.tier_weights == {"GPU": 1.0, "CPU": 0.6, "STORAGE": 0.3}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"router.listen": "8790"}, "router.listen must be HOST:PORT"),
        ({"router.bind_endpoint": "5557"}, "router.bind_endpoint must be a ZMQ"),
        ({"router.pods": "{a: {endpoint: 'tcp://x:1'}}"}, "router.pods.a.model must"),
        (
            {"router.pods": "{a: {model: m, endpoint: 'x:1'}}"},
            "router.pods.a.endpoint must be a ZMQ endpoint",
        ),
        (
            {"router.pods": "{a: {model: m, replay_endpoint: 'tcp://x:2'}}"},
            "replay_endpoint needs router.pods.a.endpoint",
        ),
        ({"router.pods": "{a: {model: m, port: 1}}"}, "unknown key in router.pods.a"),
        ({"router.tier_weights": "{GPU: 0}"}, r"router.tier_weights.GPU must be > 0"),
        ({"router.tier_weights": "{}"}, "must name 1 to 8 media"),
        ({"router.store_weight": -1}, "router.store_weight must be >= 0"),
        ({"router.store_url": "redis://x"}, "router.store_url must be"),
        ({"router.block_tokens": 0}, "router.block_tokens must be > 0"),
        ({"router.max_blocks_per_pod": 0}, "router.max_blocks_per_pod must be > 0"),
        ({"router.silence_seconds": -1}, "router.silence_seconds must be >= 0"),
        ({"router.hash_seed": -1}, r"router.hash_seed must be in \[0, 2\*\*64\)"),
        ({"router.models": "{m: {tp_size: 0}}"}, "router.models.m.tp_size must be > 0"),
    ],
)
def test_bad_router_values_name_the_key(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=overrides)
