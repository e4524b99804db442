"""Configuration: file < environment < overrides, validation messages, docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import Config, load_config, parse_bytes, render_markdown
from kvtier.errors import ConfigError


def test_defaults_are_the_embedded_default() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.disk.enabled and config.disk_path == Path("kvtier-data/disk")


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "kvtier.yaml"
    path.write_text(
        "memory:\n  capacity_bytes: 2GiB\n  policy: lru\n"
        "disk:\n  capacity_bytes: 10GB\n"
        "store:\n  quotas:\n    acme: {memory_bytes: 1GiB}\n"
    )
    env = {
        "KVTIER_MEMORY_CAPACITY_BYTES": "3GiB",
        "KVTIER_REMOTE_URLS": "file:///mnt/kv, redis://h:6379/0",
        "KVTIER_DISK_FSYNC": "yes",
    }
    config = load_config(path, env=env, overrides={"memory.policy": "s3fifo"})
    assert config.memory.capacity_bytes == 3 << 30
    assert config.memory.policy == "s3fifo"
    assert config.disk.capacity_bytes == 10 * 1000**3
    assert config.disk.fsync is True
    assert config.remote.urls == ["file:///mnt/kv", "redis://h:6379/0"]
    assert config.store.quotas["acme"].memory_bytes == 1 << 30
    assert config.store.quotas["acme"].disk_bytes is None


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("store: {write_policy: write_back}\n")
    assert (
        load_config(env={"KVTIER_CONFIG": str(path)}).store.write_policy == "write_back"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"memory.policy": "mru"}, r"memory.policy must be one of \['lru'"),
        ({"memory.capacity_bytes": "lots"}, "memory.capacity_bytes must be a size"),
        ({"memory.capacity_bytes": 0}, r"memory.capacity_bytes must be > 0"),
        (
            {"memory.capacity": "1GiB"},
            r"unknown key in memory 'capacity' \(did you mean",
        ),
        ({"memroy.policy": "lru"}, r"unknown section 'memroy' \(did you mean 'memory'"),
        ({"store.low_watermark": 0.95}, "0 < low <= high <= 1"),
        ({"disk.fsync": "maybe"}, "disk.fsync must be true or false"),
        ({"store.lease_seconds": "soon"}, "store.lease_seconds must be a number"),
        ({"policy": "lru"}, "must look like section.key"),
        ({"disk.compression": "gzip"}, r"disk.compression must be one of \['none'"),
        ({"router.pods": {"p0": True}}, "router.pods.p0 must be a mapping, got True"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=overrides)


def test_bad_environment_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KVTIER_MEMORYY_X names no section"):
        load_config(env={"KVTIER_MEMORYY_X": "1"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4GiB", 4 << 30),
        ("4g", 4 << 30),
        ("512MB", 512 * 10**6),
        ("1.5k", 1536),
        (1024, 1024),
        ("100", 100),
        ("2 MiB", 2 << 20),
    ],
)
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_replace_validates_and_round_trips() -> None:
    config = Config().replace({"disk.enabled": "false"})
    assert config.disk.enabled is False
    assert Config().replace({}) == Config()
    with pytest.raises(ConfigError):
        Config().replace({"store.block_tokens": -1})


def test_every_key_is_documented_and_docs_are_current() -> None:
    text = render_markdown()
    for section in Config().as_dict().values():
        for key in section:
            assert f"| `{key}` |" in text
    docs = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert docs.read_text() == text, (
        "run: kvtier config --markdown > docs/configuration.md"
    )
