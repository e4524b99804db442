"""``kvtier chaos faults``: every injected fault against real tiers and a real node.

Two parts, each phase of each ending with the fault cleared and recovery checked:

* **Tiers.** For each fault (EIO, ENOSPC, torn writes, latency) and each tier (the
  disk tier, a shared directory behind its health guard), a store whose memory holds
  a fraction of the blocks puts ``blocks`` blocks under the fault, then reads every
  one back: each is the exact bytes or a miss. The fault ends; ``blocks`` more are put
  and every one of them must read back exact (recovery).
* **Network.** A node behind :class:`~kvtier.chaos.proxy.ChaosProxy`; clients put and
  get through it while the proxy delays, partitions and resets connections at random.
  Each get is exact or a clear error; once the proxy heals, every acknowledged put
  reads back exact and the node holds no reservation or slot.

Wrong bytes and failed recoveries are violations; errors and misses are allowed.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.chaos.faults import FaultPlan, faulty_tiers
from kvtier.chaos.node import NodeProcess, NodeSpec
from kvtier.chaos.proxy import ChaosProxy
from kvtier.client import Client
from kvtier.config import Config
from kvtier.core.keys import KeyChain, Namespace, block_keys
from kvtier.errors import NodeError
from kvtier.store import TieredStore

__all__ = ["FaultRunConfig", "FaultRunReport", "run_faults"]

KiB = 1 << 10
FAULTS: dict[str, dict[str, float]] = {
    "eio": {"eio": 0.3},
    "enospc": {"enospc": 0.5},
    "torn": {"torn": 0.3},
    "latency": {"latency_s": 0.002},
}


@dataclass(frozen=True)
class FaultRunConfig:
    """Sizes of ``kvtier chaos faults``.

    Attributes:
        blocks: Blocks put under each fault, and again after it.
        network_s: Seconds of load through the faulty proxy.
        seed: Seeds payloads, faults and the proxy's moves.
        directory: Scratch directory (default: the system temp dir).
    """

    blocks: int = 400
    network_s: float = 20.0
    seed: int = 0
    directory: str | None = None


@dataclass
class FaultRunReport:
    """Counts per phase (``<tier>/<fault>``, ``network``); violations must be none."""

    injected: Counter[str] = field(default_factory=Counter)
    exact: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    recovered: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        for phase in sorted(set(self.exact) | set(self.injected)):
            for name in ("injected", "exact", "misses", "errors", "recovered"):
                if name != "errors" or phase == "network":  # stores never raise
                    figures[f"{phase}/{name}"] = getattr(self, name)[phase]
        figures["faults_injected"] = sum(self.injected.values())
        figures["violations"] = len(self.violations)
        return figures


def run_faults(
    cfg: FaultRunConfig, progress: Callable[[str], None] = lambda text: None
) -> FaultRunReport:
    """Runs every phase (module docstring) and returns what happened."""
    report = FaultRunReport()
    with tempfile.TemporaryDirectory(prefix="kvtier-faults-", dir=cfg.directory) as tmp:
        for tier in ("disk", "shared_fs"):
            for fault, plan in FAULTS.items():
                progress(f"{tier}: {fault}")
                _tier_phase(
                    Path(tmp) / f"{tier}-{fault}", tier, fault, plan, cfg, report
                )
        progress("network: delays, partitions, resets")
        _network_phase(Path(tmp) / "node", cfg, report)
    return report


def _payload(i: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(i).integers(0, 256, 16 * KiB, dtype=np.uint8)


def _tier_phase(
    scratch: Path,
    tier: str,
    fault: str,
    plan_values: dict[str, float],
    cfg: FaultRunConfig,
    report: FaultRunReport,
) -> None:
    phase = f"{tier}/{fault}"
    settings: dict[str, Any] = {
        "store.data_dir": str(scratch / "data"),
        "store.write_policy": "write_through",
        "memory.capacity_bytes": 64 * 16 * KiB,  # 64 blocks: reads go below
        "memory.slab_bytes": 64 * KiB,
        "disk.capacity_bytes": "256MiB",
        "remote.retry_after": 0.001,  # retried often: faults keep landing
    }
    if tier == "shared_fs":
        settings |= {"disk.enabled": False, "remote.urls": [f"file://{scratch}/shared"]}
    config = Config().replace(settings)
    plan = FaultPlan(seed=cfg.seed, **plan_values)
    tiers, wrappers = faulty_tiers(config, plan)
    keys = block_keys(
        Namespace(f"faults-{phase}", block_tokens=1), range(2 * cfg.blocks)
    )
    with TieredStore(config, tiers=tiers) as store:
        _put_all(store, keys, range(cfg.blocks))
        exact = _read_all(store, keys, range(cfg.blocks), phase, report)
        report.exact[phase] = exact
        report.misses[phase] = cfg.blocks - exact
        report.injected[phase] += sum(w.injected[fault] for w in wrappers)
        plan.clear()
        _wait_healthy(store)
        after = range(cfg.blocks, 2 * cfg.blocks)
        _put_all(store, keys, after)
        recovered = _read_all(store, keys, after, phase, report)
        report.recovered[phase] = recovered
        if recovered != cfg.blocks:
            report.violations.append(
                f"{phase}: {cfg.blocks - recovered} blocks put after the fault ended "
                "did not read back"
            )


def _put_all(store: TieredStore, keys: KeyChain, numbers: range) -> None:
    for i in numbers:
        store.put(keys[i : i + 1], [_payload(i)])


def _read_all(
    store: TieredStore,
    keys: KeyChain,
    numbers: range,
    phase: str,
    report: FaultRunReport,
) -> int:
    """Reads each block alone; how many were exact (wrong bytes violate)."""
    exact = 0
    for i in numbers:
        got = store.get(keys[i : i + 1])
        if got and np.array_equal(got[0], _payload(i)):
            exact += 1
        elif got:
            report.violations.append(f"{phase}: block {i} came back wrong")
    return exact


def _wait_healthy(store: TieredStore, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(t.healthy for t in store.stats().tiers.values()):
        if time.monotonic() > deadline:
            return  # the recovery check will say what failed
        time.sleep(0.01)


# ---------------------------------------------------------------- the network


def _network_phase(scratch: Path, cfg: FaultRunConfig, report: FaultRunReport) -> None:
    phase = "network"
    keys = block_keys(Namespace(f"faults-net-{cfg.seed}", block_tokens=1), range(4000))
    acked: set[int] = set()
    with NodeProcess(NodeSpec(scratch, memory="256MiB")) as node:
        node.start()
        with ChaosProxy(node.address) as proxy:
            stop = threading.Event()
            chaos = threading.Thread(
                target=_chaos, args=(proxy, stop, cfg.seed, report)
            )
            chaos.start()
            try:
                _load(proxy, keys, acked, cfg, report)
            finally:
                stop.set()
                chaos.join()
            proxy.heal()
            with Client(proxy.address, shared_memory=False, timeout=10) as client:
                recovered = sum(_exact(client, keys, i, report) for i in sorted(acked))
        report.recovered[phase] = recovered
        if recovered != len(acked):
            report.violations.append(
                f"network: {len(acked) - recovered} acknowledged puts did not read back"
            )
        _check_idle(node, report)


def _chaos(
    proxy: ChaosProxy, stop: threading.Event, seed: int, report: FaultRunReport
) -> None:
    """Every 50-300 ms: a reset, a delay, a short partition, or calm."""
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(0.05, 0.3)):
        proxy.heal()
        move = rng.choice(["cut", "delay", "partition", "cut-mid-frame", "calm"])
        if move == "cut":
            proxy.cut()
        elif move == "delay":
            proxy.delay_s = rng.uniform(0.001, 0.02)
        elif move == "partition":
            proxy.blackhole = True
        elif move == "cut-mid-frame":
            proxy.cut_after_bytes = rng.randrange(100, 200_000)
        if move != "calm":
            report.injected["network"] += 1


def _load(
    proxy: ChaosProxy,
    keys: KeyChain,
    acked: set[int],
    cfg: FaultRunConfig,
    report: FaultRunReport,
) -> None:
    rng = random.Random(cfg.seed + 1)
    deadline = time.monotonic() + cfg.network_s
    with Client(proxy.address, shared_memory=False, timeout=1.0, retries=1) as client:
        while time.monotonic() < deadline:
            i = rng.randrange(len(keys))
            try:
                if rng.random() < 0.5:
                    if client.put(keys[i : i + 1], [_payload(i)]).stored[0]:
                        acked.add(i)
                elif i in acked:
                    found = _exact(client, keys, i, report)
                    report.exact["network"] += found
                    report.misses["network"] += not found
            except NodeError:
                report.errors["network"] += 1


def _exact(client: Client, keys: KeyChain, i: int, report: FaultRunReport) -> bool:
    """Whether block i reads back exact (a miss: False; wrong bytes violate)."""
    got = client.get(keys[i : i + 1])
    if got and not np.array_equal(got[0], _payload(i)):
        report.violations.append(f"network: block {i} came back wrong")
    return bool(got) and np.array_equal(got[0], _payload(i))


def _check_idle(
    node: NodeProcess, report: FaultRunReport, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with node.client() as client:
            status = client.stats()
        stats = status["stats"]
        if stats["open_reservations"] == stats["held_slots"] == 0:
            return
        if time.monotonic() > deadline:
            report.violations.append(f"network: the node still holds {stats}")
            return
        time.sleep(0.05)
