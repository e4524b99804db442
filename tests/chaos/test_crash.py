"""Crash consistency of a real node: SIGKILL mid-load, restart, verify every block."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvtier.chaos.crash import (
    CrashConfig,
    CrashReport,
    Record,
    State,
    _verify_restart,
    run_crash,
)
from kvtier.chaos.node import NodeProcess, NodeSpec
from kvtier.tiers.disk import DiskTier


def test_a_few_kill_cycles_lose_nothing_committed(tmp_path: Path) -> None:
    report = run_crash(CrashConfig(cycles=4, graceful_every=4, directory=str(tmp_path)))
    assert report.violations == []
    assert (report.kills, report.graceful_stops, report.cycles) == (3, 1, 4)
    assert report.puts_acked > 0 and report.gets_verified > 0
    assert report.committed_checked > 0 and report.blocks_verified_after_restart > 0
    assert report.records_audited > 0


def test_the_harness_notices_a_lost_block_and_a_resurrected_one(
    tmp_path: Path,
) -> None:
    """The verification can fail: tamper with a killed node's disk and see it."""
    cfg = CrashConfig(writers=1, keys_per_writer=8)
    record = Record(cfg)
    node = NodeProcess(NodeSpec(tmp_path / "node"))
    with node:
        node.start("store.write_policy=write_through")
        with node.client() as client:
            assert client.put(record.keys, [record.payload(i) for i in range(8)])
        record.set(range(8), State.COMMITTED)
        record.set([5], State.ABSENT)  # as if its delete had been acknowledged
        node.kill()
        with DiskTier(tmp_path / "node" / "disk", capacity_bytes=1 << 30) as disk:
            where = disk.locate(record.keys[2])
        assert where is not None
        path, offset, nbytes = where
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"\xff" * 8, offset + nbytes - 8)  # block 2 is damaged
        os.close(fd)
        node.start()
        report = CrashReport()
        _verify_restart(node, record, report, 0)
    assert report.violations == [
        # listed before the read found it corrupt (and quarantined it)
        "cycle 0: block 2: get False, contains True, list True",
        "cycle 0: committed block 2 is lost",
        "cycle 0: deleted block 5 came back",
    ]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~5 min here; the default 300 s would cut it
def test_two_hundred_kill_cycles_lose_nothing(tmp_path: Path) -> None:
    report = run_crash(CrashConfig(cycles=200, seed=1, directory=str(tmp_path)))
    assert report.violations == []
    assert report.kills == 180 and report.graceful_stops == 20
    assert report.committed_checked > 10_000
