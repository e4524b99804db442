"""``kvtier check``: audit, and with ``fix`` repair, what a node keeps on disk, offline.

* **The disk tier** (``<store.data_dir>/disk`` or ``disk.path``): the SQLite index
  opens and passes SQLite's own ``integrity_check``; every row's record exists, its
  header verifies and names that key and those sizes, and its payload matches its
  checksum; no segment file is an orphan. ``fix``: an index that does not open or
  fails the check is set aside and rebuilt from the segment files
  (:mod:`kvtier.tiers._disk_rebuild`), rows whose record fails are dropped, orphan
  segments are unlinked.
* **Shared directories** (``file://`` among ``remote.urls``): every block file is read
  and verified; a link or anything but a regular file is bad too. ``fix``: bad files
  go to ``quarantine/``, abandoned ``.part`` files are removed.
* Redis, S3 and peer tiers are services, not files here: listed as not audited.

The node must be stopped: the disk tier's lock file keeps an audit off a live node's
directory (a shared directory may stay in use by other nodes: its audit is safe). The
audit opens the disk tier as a starting node would, which recovers from a crash first:
segment files no row points into (a batch cut short) are reclaimed then, not reported.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from kvtier.config import Config
from kvtier.errors import StorageError
from kvtier.tiers._disk_rebuild import rebuild_index
from kvtier.tiers._segments import segment_files
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.remote import RemoteURL
from kvtier.tiers.shared_fs import SharedFSTier

__all__ = ["DataDirReport", "TierAudit", "audit_data_dir"]


@dataclass(frozen=True)
class TierAudit:
    """What the audit of one tier found.

    Attributes:
        tier: ``disk`` or ``shared_fs``.
        path: Its directory.
        num_checked: Records (disk) or files (shared directory) verified.
        problems: One line per thing found wrong.
        num_fixed: Rows dropped, files quarantined or removed, indexes rebuilt
            (``fix`` only).
        num_rebuilt: Blocks the rebuilt index holds (0: no rebuild).
    """

    tier: str
    path: str
    num_checked: int
    problems: tuple[str, ...] = ()
    num_fixed: int = 0
    num_rebuilt: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class DataDirReport:
    """The audit of a node's data: one entry per tier, and what was not audited."""

    data_dir: str
    tiers: tuple[TierAudit, ...]
    not_audited: tuple[str, ...]
    fixed: bool

    @property
    def ok(self) -> bool:
        """Nothing was found wrong."""
        return all(tier.ok for tier in self.tiers)


def audit_data_dir(config: Config, fix: bool = False) -> DataDirReport:
    """Audits the tiers ``config`` keeps in files (module docstring).

    Raises:
        StorageError: The disk tier is open in a running node, or a directory cannot
            be read (or, with ``fix``, changed).
    """
    tiers = []
    if config.disk.enabled:
        tiers.append(_audit_disk(config.disk_path, config.disk.capacity_bytes, fix))
    skipped = []
    for url in config.remote.urls:
        parsed = RemoteURL.parse(url)
        if parsed.scheme == "file":
            tiers.append(_audit_shared(Path(parsed.path), fix))
        else:
            skipped.append(f"{url.split('?')[0]}: a service, not files here")
    return DataDirReport(str(config.store.data_dir), tuple(tiers), tuple(skipped), fix)


def _audit_disk(root: Path, capacity_bytes: int, fix: bool) -> TierAudit:
    problems: list[str] = []
    rebuilt = 0
    broken = _index_problem(root / "index.sqlite3")
    if broken is not None:
        problems.append(broken)
        if not fix:
            return TierAudit("disk", str(root), 0, tuple(problems))
        rebuilt = rebuild_index(root)
    with DiskTier(root, capacity_bytes=capacity_bytes) as tier:
        report = tier.check(fix=fix)
    problems += [f"block {key}: {reason}" for key, reason in report.bad_blocks]
    problems += [f"orphan segment {name}" for name in report.orphan_segments]
    fixed = report.num_rows_removed + report.num_segments_removed + bool(rebuilt)
    return TierAudit(
        "disk", str(root), report.num_checked, tuple(problems), fixed, rebuilt
    )


def _index_problem(db_path: Path) -> str | None:
    """Why the index cannot be trusted, or ``None``."""
    if not db_path.exists():
        files = (
            segment_files(db_path.parent / "segments")
            if db_path.parent.is_dir()
            else []
        )
        if files:  # opening the tier would start an empty index beside them
            return f"index {db_path.name} is missing beside {len(files)} segments"
        return None  # a new tier
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return f"index {db_path.name} does not open: {exc}"
    try:
        (verdict,) = db.execute("PRAGMA integrity_check").fetchone()
        db.execute("SELECT count(*) FROM blocks").fetchone()
    except sqlite3.Error as exc:
        return f"index {db_path.name} is unreadable: {exc}"
    finally:
        db.close()
    return None if verdict == "ok" else f"index fails integrity_check: {verdict}"


def _audit_shared(root: Path, fix: bool) -> TierAudit:
    if not root.is_dir():
        raise StorageError(f"shared directory {root} does not exist")
    with SharedFSTier(root) as tier:
        report = tier.check(fix=fix)
    problems = [f"{path}: {reason}" for path, reason in report.bad]
    problems += [f"abandoned part file {path}" for path in report.stale_parts]
    fixed = len(report.bad) + len(report.stale_parts) if fix else 0
    return TierAudit("shared_fs", str(root), report.num_checked, tuple(problems), fixed)
