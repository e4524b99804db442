"""``kvtier demo`` and ``kvtier bench ttft`` end to end (short sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def kvtier(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_demo_serves_shared_prefixes_with_the_same_tokens(tmp_path: Path) -> None:
    out = kvtier(
        "demo", "--quick", "--json", "--set", f"store.data_dir={tmp_path / 'kv'}"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TTFT kvtier" in out.stdout and "generated tokens identical" in out.stdout
    totals = json.loads(out.stdout.strip().splitlines()[-1])
    # 2 groups x 3 prompts of 256 + 32 tokens: the 4 later prompts load 256 each
    assert totals["hit_ratio"] == pytest.approx(4 * 256 / (6 * 288))
    assert totals["identical_ratio"] == 1.0


def test_bench_ttft_reports_times_and_ratios() -> None:
    out = kvtier("bench", "ttft", "--quick", "--repeats", "1", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"ttft_nocache_1024_ms", "ttft_hit_2048_ms", "speedup_2048_ratio"} <= set(
        figures
    )
    assert all(key.endswith(("_ms", "_s", "_ratio")) for key in figures)
