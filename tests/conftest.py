"""Fixtures shared across the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Helpers shared by test directories (real nodes, real etcd): import them by name.
sys.path.insert(0, str(Path(__file__).parent / "support"))


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts small real filesystems (tmpfs) that fill up: ``mount_tmpfs("4m")``.

    Root only (the suite runs as root in CI); as root a failed mount fails the test.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            check=True,
        )
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in mounted:
            if subprocess.run(["umount", str(point)]).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], check=True)
