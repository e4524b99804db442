"""A real node for the chaos tests, restartable (kvtier.chaos.node)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.chaos.node import NodeProcess, NodeSpec


@pytest.fixture(scope="module")
def chaos_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node shared by a module's tests (each test uses its own keys)."""
    spec = NodeSpec(tmp_path_factory.mktemp("chaos") / "node", memory="128MiB")
    with NodeProcess(spec) as node:
        node.start()
        yield node
