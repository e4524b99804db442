"""Fixtures: real kvtier nodes, started as subprocesses on 127.0.0.1."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kvnode import NodeProcess, start_node


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def factory(
        *settings: str, token: str | None = None, name: str = "node", **kwargs: Any
    ) -> NodeProcess:
        data_dir = tmp_path / f"{name}{len(started)}"
        data_dir.mkdir()
        node = start_node(data_dir, *settings, token=token, **kwargs)
        started.append(node)
        return node

    yield factory
    for node in started:
        with contextlib.suppress(Exception):
            node.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node shared by a module's tests (tests use their own keys)."""
    data_dir = tmp_path_factory.mktemp("node")
    started = start_node(data_dir)
    yield started
    started.stop()
