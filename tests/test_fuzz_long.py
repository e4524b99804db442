"""The slow suite's long fuzz run: every fuzz target with twenty times the inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [
    "tests/server/test_fuzz_node.py",
    "tests/server/test_protocol_faults.py",
    "tests/router/test_fuzz.py",
    "tests/test_config_fuzz.py",
    "tests/sim/test_trace_fuzz.py",
]


@pytest.mark.slow
@pytest.mark.timeout(3700)  # ~6 min here; the subprocess has its own 3600 s
def test_every_fuzz_target_with_twenty_times_the_inputs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TARGETS,
         "--hypothesis-show-statistics"],
        cwd=ROOT,
        env={**os.environ, "KVFUZZ_SCALE": "20"},
        capture_output=True,
        text=True,
        timeout=3600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
