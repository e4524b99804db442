"""Crash consistency: SIGKILL a real node mid-load, restart it, verify every block.

One cycle:

1. (re)start ``kvtier serve`` on the same data directory, with this cycle's write
   policy (``write_through`` and ``write_behind`` alternate);
2. verify what it serves against the writers' record (below);
3. run writers (threads, one over the same-host shared-memory path, the others over
   TCP), each owning a range of keys, doing puts, gets, deletes and matches of runs of
   1-4 consecutive blocks; a small memory tier keeps eviction and demotion going, and
   every get is compared byte for byte with what was written;
4. at a random moment, SIGKILL the node (every ``graceful_every``-th cycle, SIGTERM
   instead, which must flush);
5. audit the data directory offline (index rows against segment records, checksums).

The record. Blocks are content addressed, so a key has one payload, a function of the
key's number. Each key is in one state:

| state | meaning | after a restart the block must be |
| --- | --- | --- |
| absent | never stored, or its delete was acknowledged | absent |
| putting | a put was sent, its answer never came | absent or exact |
| stored | a put was acknowledged (in memory at least) | absent or exact |
| committed | on disk: see below | present and exact |
| deleting | a delete was sent, its answer never came | absent or exact |

A block is *committed* once the node has said it is on disk: a ``write_through`` put
returned (the node writes it to disk before answering), the node listed it with
``disk`` among its tiers (``list``, which reports a disk copy only after the index
commit of its batch), or the node exited 0 after SIGTERM (which flushes). "Exact"
means equal to the written bytes, compared in full. Any block the node lists must be
in the record; any block it serves must be exact, during the load and after restart.
"""

from __future__ import annotations

import contextlib
import enum
import random
import statistics
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.chaos.node import NodeProcess, NodeSpec
from kvtier.client import Client
from kvtier.config import Config
from kvtier.core.keys import KeyChain, Namespace, block_keys
from kvtier.errors import KVTierError

__all__ = ["CrashConfig", "CrashReport", "run_crash"]

KiB = 1 << 10
Array = np.ndarray[Any, Any]


class State(enum.Enum):
    ABSENT = "absent"
    PUTTING = "putting"
    STORED = "stored"
    COMMITTED = "committed"
    DELETING = "deleting"


@dataclass(frozen=True)
class CrashConfig:
    """What the harness runs.

    Attributes:
        cycles: Kill-restart-verify cycles.
        writers: Writer threads (the first uses shared memory, the rest TCP).
        keys_per_writer: Keys each writer owns.
        min_block_bytes / max_block_bytes: Sizes of blocks (fixed per key).
        memory: The node's memory tier (small: eviction keeps going).
        min_run_s / max_run_s: The kill lands uniformly in this window of the load.
        graceful_every: Every n-th cycle ends with SIGTERM instead (0: never).
        seed: Seeds the load, the sizes and the kill times.
        directory: Where the node's data lives (default: a temporary directory).
    """

    cycles: int = 200
    writers: int = 4
    keys_per_writer: int = 128
    min_block_bytes: int = 4 * KiB
    max_block_bytes: int = 64 * KiB
    memory: str = "8MiB"
    min_run_s: float = 0.05
    max_run_s: float = 1.2
    graceful_every: int = 10
    seed: int = 0
    directory: str | None = None


@dataclass
class CrashReport:
    """What the harness saw. ``violations`` must be empty."""

    cycles: int = 0
    kills: int = 0
    graceful_stops: int = 0
    puts_acked: int = 0
    gets_verified: int = 0
    deletes_acked: int = 0
    blocks_verified_after_restart: int = 0
    committed_checked: int = 0
    records_audited: int = 0
    compactions: int = 0
    restart_s: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # the first 50
    num_violations: int = 0

    def figures(self) -> dict[str, float]:
        """The report as flat figures (``kvtier chaos crash --json``)."""
        return {
            "cycles": self.cycles,
            "kills": self.kills,
            "graceful_stops": self.graceful_stops,
            "puts_acked": self.puts_acked,
            "gets_verified": self.gets_verified,
            "deletes_acked": self.deletes_acked,
            "blocks_verified_after_restart": self.blocks_verified_after_restart,
            "committed_checked": self.committed_checked,
            "records_audited": self.records_audited,
            "compactions": self.compactions,
            "restart_median_s": statistics.median(self.restart_s or [0.0]),
            "violations": self.num_violations,
        }


class Record:
    """What the writers did, per key. Thread-safe."""

    def __init__(self, cfg: CrashConfig) -> None:
        num_keys = cfg.writers * cfg.keys_per_writer
        ns = Namespace(f"kvtier-crash-{cfg.seed}", block_tokens=1)
        self.keys: KeyChain = block_keys(ns, list(range(num_keys)))
        self.number = {key: i for i, key in enumerate(self.keys)}
        rng = np.random.default_rng(cfg.seed)
        self.sizes = rng.integers(
            cfg.min_block_bytes, cfg.max_block_bytes + 1, num_keys
        )
        self.seed = cfg.seed
        self.states = [State.ABSENT] * num_keys
        self.lock = threading.Lock()

    def payload(self, i: int) -> Array:
        rng = np.random.default_rng((self.seed, i))
        return rng.integers(0, 256, int(self.sizes[i]), dtype=np.uint8)

    def set(self, numbers: range | list[int], state: State) -> None:
        with self.lock:
            for i in numbers:
                self.states[i] = state

    def exact(self, i: int, block: Array) -> bool:
        return bool(np.array_equal(block.reshape(-1).view(np.uint8), self.payload(i)))


@dataclass
class _Cycle:
    """One cycle's shared flags and counters."""

    killed: threading.Event = field(default_factory=threading.Event)
    puts: int = 0
    gets: int = 0
    deletes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


def run_crash(
    cfg: CrashConfig, progress: Callable[[int], None] = lambda cycle: None
) -> CrashReport:
    """Runs ``cfg.cycles`` kill-restart-verify cycles; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="kvtier-crash-", dir=cfg.directory) as tmp:
        data_dir = Path(tmp) / "node"
        node = NodeProcess(NodeSpec(data_dir, memory=cfg.memory, settings=_SETTINGS))
        record = Record(cfg)
        report = CrashReport()
        rng = random.Random(cfg.seed)
        try:
            for cycle in range(cfg.cycles):
                progress(cycle)
                _one_cycle(node, record, report, cfg, cycle, rng)
        finally:
            node.kill()
        return report


# Live blocks are ~17 MiB at most; 48 MiB of disk fills with the garbage deletes and
# re-puts leave, so compaction runs (and gets killed) too, while nothing is refused.
_SETTINGS = (
    "disk.capacity_bytes=48MiB",
    "disk.segment_bytes=1MiB",
    "memory.slab_bytes=256KiB",
    "server.drain_seconds=5",
)


def _one_cycle(
    node: NodeProcess,
    record: Record,
    report: CrashReport,
    cfg: CrashConfig,
    cycle: int,
    rng: random.Random,
) -> None:
    policy = ("write_through", "write_behind")[cycle % 2]
    report.restart_s.append(node.start(f"store.write_policy={policy}"))
    _verify_restart(node, record, report, cycle)
    state = _Cycle()
    threads = [
        threading.Thread(
            target=_writer,
            args=(node, record, state, report, cfg, w, policy, rng.random()),
            name=f"crash-writer-{w}",
        )
        for w in range(cfg.writers)
    ]
    for thread in threads:
        thread.start()
    graceful = cfg.graceful_every > 0 and (cycle + 1) % cfg.graceful_every == 0
    state.killed.wait(rng.uniform(cfg.min_run_s, cfg.max_run_s))  # the kill point
    report.compactions += _compactions(node)
    state.killed.set()
    if graceful:
        if node.stop() == 0:  # SIGTERM: drains, then flushes everything acknowledged
            with record.lock:
                record.states = [
                    State.COMMITTED if s is State.STORED else s for s in record.states
                ]
        report.graceful_stops += 1
    else:
        node.kill()
        report.kills += 1
    for thread in threads:
        thread.join()
    report.cycles += 1
    report.puts_acked += state.puts
    report.gets_verified += state.gets
    report.deletes_acked += state.deletes
    _audit(node, report, cycle)


def _compactions(node: NodeProcess) -> int:
    """Disk segments the node compacted since it started (kills land in them too)."""
    try:
        with node.client(timeout=5, retries=0) as client:
            return int(client.stats()["stats"]["tiers"]["disk"]["compactions"])
    except (KVTierError, OSError):
        return 0


def _writer(
    node: NodeProcess,
    record: Record,
    state: _Cycle,
    report: CrashReport,
    cfg: CrashConfig,
    w: int,
    policy: str,
    seed: float,
) -> None:
    rng = random.Random(seed)
    first = w * cfg.keys_per_writer
    try:
        client = node.client(shared_memory=w == 0, timeout=30, retries=0)
    except (KVTierError, OSError) as exc:
        if not state.killed.is_set():
            _violation(report, f"writer {w} could not connect: {exc}")
        return
    try:
        ops = 0
        while not state.killed.is_set():
            start = first + rng.randrange(cfg.keys_per_writer)
            run = range(
                start, min(start + rng.randint(1, 4), first + cfg.keys_per_writer)
            )
            _op(client, record, state, report, rng.random(), run, policy)
            ops += 1
            if policy == "write_behind" and ops % 25 == 0:
                _note_on_disk(client, record, first, cfg.keys_per_writer)
    except (KVTierError, OSError) as exc:
        if not state.killed.is_set():
            _violation(report, f"writer {w}: {type(exc).__name__} {exc} (node alive)")
    finally:
        with contextlib.suppress(KVTierError, OSError):
            client.close()


def _op(
    client: Client,
    record: Record,
    state: _Cycle,
    report: CrashReport,
    dice: float,
    run: range,
    policy: str,
) -> None:
    keys = record.keys[run.start : run.stop]
    if dice < 0.55:
        before = [record.states[i] for i in run]
        fresh = [
            i for i, s in zip(run, before, strict=True) if s is not State.COMMITTED
        ]
        record.set(fresh, State.PUTTING)  # a put never takes a committed block away
        stored = client.put(keys, [record.payload(i) for i in run]).stored
        acked = [i for i, ok in zip(run, stored, strict=True) if ok]
        durable = policy == "write_through"
        record.set(
            [i for i in fresh if i in acked],
            State.COMMITTED if durable else State.STORED,
        )
        record.set([i for i in fresh if i not in acked], State.ABSENT)
        state.count(puts=len(acked))
    elif dice < 0.85:
        blocks = client.get(keys)
        for i, block in zip(run, blocks, strict=False):
            if not record.exact(i, block):
                _violation(report, f"get served wrong bytes for block {i}")
        state.count(gets=len(blocks))
    elif dice < 0.95:
        record.set(run, State.DELETING)
        client.delete(keys)
        record.set(run, State.ABSENT)
        state.count(deletes=len(run))
    else:
        client.match(keys)


def _note_on_disk(client: Client, record: Record, first: int, count: int) -> None:
    """Marks this writer's acknowledged blocks the node lists on disk as committed.

    Only this writer changes its keys, and it waits here: no put or delete of them
    runs while the listing is taken.
    """
    for info in client.list(limit=1 << 20):
        i = record.number.get(info.key)
        if i is not None and first <= i < first + count and "disk" in info.tiers:
            with record.lock:
                if record.states[i] is State.STORED:
                    record.states[i] = State.COMMITTED


def _verify_restart(
    node: NodeProcess, record: Record, report: CrashReport, cycle: int
) -> None:
    """Everything served is exact, nothing committed is missing, nothing deleted is
    back; then the record becomes what the node holds (all on disk now)."""
    with node.client(timeout=60) as client:
        listed = {info.key for info in client.list(limit=1 << 20)}
        present = client.contains(list(record.keys))
        for key in listed:
            if key not in record.number:
                _violation(report, f"cycle {cycle}: the node lists an unknown key")
        for i, key in enumerate(record.keys):
            blocks = client.get([key])
            served = bool(blocks)
            if served and not record.exact(i, blocks[0]):
                _violation(report, f"cycle {cycle}: block {i} came back wrong")
            if served != present[i] or served != (key in listed):
                _violation(
                    report,
                    f"cycle {cycle}: block {i}: get {served}, contains {present[i]}, "
                    f"list {key in listed}",
                )
            was = record.states[i]
            if was is State.COMMITTED:
                report.committed_checked += 1
                if not served:
                    _violation(report, f"cycle {cycle}: committed block {i} is lost")
            if was is State.ABSENT and served:
                _violation(report, f"cycle {cycle}: deleted block {i} came back")
            report.blocks_verified_after_restart += served
            record.states[i] = State.COMMITTED if served else State.ABSENT


def _audit(node: NodeProcess, report: CrashReport, cycle: int) -> None:
    """The offline audit of the killed node's data directory finds nothing wrong."""
    from kvtier.tiers.audit import audit_data_dir

    config = Config().replace({"store.data_dir": str(node.spec.data_dir)})
    for tier in audit_data_dir(config).tiers:
        report.records_audited += tier.num_checked
        for problem in tier.problems:
            _violation(report, f"cycle {cycle}: audit: {problem}")


_VIOLATIONS_KEPT = 50
_violations_lock = threading.Lock()


def _violation(report: CrashReport, message: str) -> None:
    with _violations_lock:
        report.num_violations += 1
        if len(report.violations) < _VIOLATIONS_KEPT:
            report.violations.append(message)
