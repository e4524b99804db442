"""``kvtier check``: a stopped node's data audited offline and repaired, against real
files damaged on purpose."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier import Namespace, TieredStore, block_keys
from kvtier.config import Config
from kvtier.tiers.disk import DiskTier

KEYS = block_keys(Namespace("audit", block_tokens=1), list(range(12)))


def block(i: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(i).integers(0, 256, 32 * 1024, dtype=np.uint8)


def settings(data: Path, shared: Path | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {
        "store.data_dir": str(data),
        "store.write_policy": "write_through",
        "memory.capacity_bytes": "4MiB",
        "disk.capacity_bytes": "64MiB",
        "disk.segment_bytes": "1MiB",
    }
    if shared is not None:
        values["remote.urls"] = [f"file://{shared}"]
    return values


def fill(data: Path, shared: Path | None = None) -> None:
    with TieredStore(Config().replace(settings(data, shared))) as store:
        for i, key in enumerate(KEYS):
            assert store.put([key], [block(i)])


def check(data: Path, *extra: str, shared: Path | None = None) -> tuple[int, Any]:
    args = [sys.executable, "-m", "kvtier.cli", "check", *extra]
    for key, value in settings(data, shared).items():
        shown = ",".join(value) if isinstance(value, list) else value
        args += ["--set", f"{key}={shown}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout) if out.stdout else out.stderr


def damage(data: Path, i: int) -> None:
    """Flips a byte in the middle of block i's payload, in its segment file."""
    with DiskTier(data / "disk", capacity_bytes=1 << 30) as tier:
        where = tier.locate(KEYS[i])
    assert where is not None
    path, offset, nbytes = where
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset + nbytes // 2)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset + nbytes // 2)
    finally:
        os.close(fd)


def readable(data: Path) -> list[int]:
    """Which blocks a store opened on ``data`` serves, each checked byte for byte."""
    found = []
    with TieredStore(Config().replace(settings(data))) as store:
        for i, key in enumerate(KEYS):
            got = store.get([key])
            if got:
                assert np.array_equal(got[0], block(i)), f"block {i} is wrong"
                found.append(i)
    return found


def test_a_clean_data_dir_passes(tmp_path: Path) -> None:
    fill(tmp_path / "data")
    code, report = check(tmp_path / "data")
    assert code == 0 and report["ok"] is True
    (disk,) = report["tiers"]
    assert disk["tier"] == "disk" and disk["num_checked"] == 12


def test_a_corrupt_record_is_found_and_fixed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data)
    damage(data, 3)
    damage(data, 7)
    code, report = check(data)
    assert code == 1 and report["ok"] is False
    problems = report["tiers"][0]["problems"]
    assert len(problems) == 2 and all("checksum" in p for p in problems)
    assert KEYS[3].hex() in problems[0] + problems[1]
    code, report = check(data, "--fix")
    assert code == 0 and report["tiers"][0]["num_fixed"] == 2
    code, report = check(data)
    assert code == 0 and report["ok"]
    assert readable(data) == [i for i in range(12) if i not in (3, 7)]


def test_a_leftover_segment_is_reclaimed_like_a_crash_leftover(
    tmp_path: Path,
) -> None:
    """A segment no row points into is what a crash mid-batch leaves; the audit opens
    the tier as a starting node would, which reclaims it."""
    data = tmp_path / "data"
    fill(data)
    segments = sorted((data / "disk" / "segments").iterdir())
    leftover = segments[0].with_name("000000099999.seg")
    shutil.copy(segments[0], leftover)
    code, report = check(data)
    assert code == 0 and report["ok"] and report["tiers"][0]["num_checked"] == 12
    assert not leftover.exists() and readable(data) == list(range(12))


@pytest.mark.parametrize("how", ["garbage", "missing"])
def test_a_lost_index_is_rebuilt_from_the_segments(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"
    fill(data)
    index = data / "disk" / "index.sqlite3"
    for path in index.parent.glob("index.sqlite3*"):
        path.unlink()
    if how == "garbage":
        index.write_bytes(b"this is no database" * 1000)
    code, report = check(data)
    assert code == 1 and "index" in report["tiers"][0]["problems"][0]
    code, report = check(data, "--fix")
    assert code == 0 and report["tiers"][0]["num_rebuilt"] == 12
    assert check(data)[1]["ok"] is True
    assert readable(data) == list(range(12))  # every block, byte for byte


def test_a_torn_segment_tail_loses_only_the_torn_record(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data)
    with DiskTier(data / "disk", capacity_bytes=1 << 30) as tier:
        where = tier.locate(KEYS[11])
    assert where is not None
    path, offset, nbytes = where
    os.truncate(path, offset + nbytes - 100)  # the last record is cut short
    code, report = check(data, "--fix")
    assert code == 0 and len(report["tiers"][0]["problems"]) == 1
    assert readable(data) == list(range(11))


def test_shared_directories_are_audited_too(tmp_path: Path) -> None:
    data, shared = tmp_path / "data", tmp_path / "shared"
    fill(data, shared)
    files = sorted((shared / "blocks").rglob("*.kvb"))
    assert len(files) == 12
    raw = bytearray(files[5].read_bytes())
    raw[-10] ^= 0xFF
    files[5].write_bytes(bytes(raw))
    os.symlink("/etc/passwd", files[6].with_name("0" * 32 + ".kvb"))
    code, report = check(data, shared=shared)
    assert code == 1
    disk, shared_audit = report["tiers"]
    assert disk["problems"] == []
    assert len(shared_audit["problems"]) == 2
    code, report = check(data, "--fix", shared=shared)
    assert code == 0 and report["tiers"][1]["num_fixed"] == 2
    assert check(data, shared=shared)[0] == 0
    assert len(list((shared / "quarantine").iterdir())) == 2


def test_a_running_nodes_directory_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with TieredStore(Config().replace(settings(data))):
        code, error = check(data)
    assert code == 1 and "already open" in error
