"""Fixtures of the engine integrations: stores and a live node."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvtier
from kvtier.store import TieredStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvhelpers import store_settings  # noqa: E402
from kvnode import NodeProcess, start_node  # noqa: E402


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leaves test_vllm.py uncollected where vLLM is absent and the run deselects its
    marker anyway (the default run); elsewhere it is collected, and a missing vLLM
    shows as a skip."""
    if collection_path.name != "test_vllm.py" or importlib.util.find_spec("vllm"):
        return None
    return "not vllm" in (config.getoption("markexpr") or "") or None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TieredStore]:
    with kvtier.open(overrides=store_settings(tmp_path / "kv")) as opened:
        yield opened


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One live node for a module's tests (each test uses its own keys)."""
    started = start_node(tmp_path_factory.mktemp("node"))
    yield started
    started.stop()
