"""Load and soak: 64 clients mixing match / get / put against a real node.

Speed is the bench's business (``kvtier bench soak``); these tests hold what must be
true at any speed: no error, no wrong byte, nothing leaked once the clients are gone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.bench.soak import SoakConfig, run_soak


def test_sixty_four_clients_for_a_while_without_error_or_leak(tmp_path: Path) -> None:
    # one minute: 5 s of warm-up, 55 s measured
    cfg = SoakConfig(
        clients=64,
        seconds=55.0,
        warmup_s=5.0,
        max_warmup_s=5.0,
        directory=str(tmp_path),
    )
    results = run_soak(cfg, progress=print)  # shown when a test fails
    assert results["errors"] == 0 and results["wrong_bytes"] == 0
    assert results["requests_per_s"] > 0 and 0 < results["hit_ratio"] < 1
    assert results["get_p50_ms"] > 0 and results["put_p50_ms"] > 0  # all three ran
    for leak in ("reservations", "held_slots", "sockets", "connections"):
        assert results[f"leaked_{leak}"] == 0, leak


@pytest.mark.slow
@pytest.mark.timeout(1800)  # up to 10 min of warm-up, 10 measured, then the drain
def test_ten_minute_soak(tmp_path: Path) -> None:
    results = run_soak(SoakConfig(directory=str(tmp_path)), progress=print)
    assert results["errors"] == 0 and results["wrong_bytes"] == 0
    for leak in ("reservations", "held_slots", "sockets", "connections"):
        assert results[f"leaked_{leak}"] == 0, leak
    assert results["rss_growth_fraction"] <= 0.05
