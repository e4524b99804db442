"""Fixtures of the engine integrations: stores and a live node."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvtier
from kvtier.store import TieredStore

# Nodes start the way the server tests start them (tests/server/kvnode.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvhelpers import store_settings  # noqa: E402
from kvnode import NodeProcess, start_node  # noqa: E402


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
