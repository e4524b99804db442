"""Fixtures of the engine integrations: tiny random models, stores, a live node."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvtier.store import TieredStore

# Nodes are started the way the server tests start them (tests/server/kvnode.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvnode import NodeProcess, start_node  # noqa: E402

BLOCK_TOKENS = 16


def store_settings(data_dir: Path, **extra: Any) -> dict[str, Any]:
    """Overrides of a small embedded store under ``data_dir``."""
    return {
        "store.data_dir": str(data_dir),
        "store.block_tokens": BLOCK_TOKENS,
        "memory.capacity_bytes": "64MiB",
        "disk.capacity_bytes": "256MiB",
        **extra,
    }


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


def tiny_model(kind: str, seed: int = 0) -> Any:
    """A tiny random Llama or Qwen2 in fp32 (no download)."""
    from kvtier.integrations.models import build_model

    return build_model(kind, "tiny", seed=seed)
