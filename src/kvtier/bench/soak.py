"""``kvtier bench soak``: many clients mixing match / get / put on a node, for long.

It starts its own node (a subprocess on loopback: memory + disk, write-behind) and runs
``clients`` asyncio clients in this process (every ``shm_every``-th one over the
same-host shared-memory path, the rest over TCP). Each client loops: pick a prompt
(skewed: some prompts are hot; a ``fresh_fraction`` of them never seen before),
``match`` its blocks, ``get`` the leading hits and compare every byte with what was
put, ``put`` the rest. Fresh prompts keep puts coming; the memory tier is smaller than
the hot prompts' blocks and the disk tier smaller than all that is put, so eviction,
demotion and promotion run all along, on both tiers.

Figures, after a warm-up that lasts until the node's RSS stops climbing (the arena, the
disk and the policies' bounded bookkeeping are full; RSS counts the arena pages
touched):

* throughput (requests and payload bytes per second) and latency p50 / p99 / p999
  per operation;
* errors and wrong bytes (target 0 each);
* ``throughput_stability_ratio``: requests per second in the last third over the first
  third of the measured run (higher is better; a slowing node shows below 1);
* ``rss_growth_fraction``: the node's RSS at the end over right after warm-up, minus 1
  (target <= 0.05), and the same for its anonymous memory alone;
* leaks once every client has gone: reservations and held slots still open in the
  store, sockets the node still holds, against the node before the load (target 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.chaos.node import NodeProcess, NodeSpec
from kvtier.client import AsyncClient
from kvtier.core.keys import KeyChain, Namespace, block_keys
from kvtier.errors import NodeError

__all__ = ["SoakConfig", "register", "run_soak"]

KiB = 1 << 10
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class SoakConfig:
    """What ``kvtier bench soak`` runs (``--quick`` shortens it).

    Attributes:
        clients: Concurrent clients.
        seconds: Length of the measured run, after the warm-up.
        warmup_s: Least load before measuring. The warm-up goes on until the
            node's RSS grew less than ``settled_fraction`` over the last
            ``settle_window_s`` (the arena, the disk tier and the eviction policies'
            bounded bookkeeping, such as the default policy's ghost list of victims,
            are full), or ``max_warmup_s`` has passed.
        max_warmup_s: Most warm-up.
        settle_window_s: Window of the settling test.
        settled_fraction: RSS growth over that window that counts as settled.
        prompts: Distinct prompts the clients draw from.
        blocks_per_prompt: Blocks of each prompt.
        block_bytes: Bytes of each block.
        fresh_fraction: Share of requests for a prompt never seen before.
        memory: The node's memory tier (smaller than the hot prompts' blocks).
        disk: The node's disk tier (smaller than all the blocks put).
        shm_every: Every n-th client uses the same-host shared-memory path.
        seed: Seeds the clients' choices.
        directory: Scratch directory for the node's data (default: temp dir).
    """

    clients: int = 64
    seconds: float = 600.0
    warmup_s: float = 60.0
    max_warmup_s: float = 600.0
    settle_window_s: float = 60.0
    settled_fraction: float = 0.01
    prompts: int = 1500
    blocks_per_prompt: int = 8
    block_bytes: int = 32 * KiB
    fresh_fraction: float = 0.2
    memory: str = "128MiB"
    disk: str = "512MiB"
    shm_every: int = 8
    seed: int = 0
    directory: str | None = None

    @classmethod
    def quick(cls, directory: str | None = None) -> SoakConfig:
        return cls(seconds=20.0, warmup_s=5.0, max_warmup_s=5.0, directory=directory)


def register(bench_sub: Any) -> None:
    parser = bench_sub.add_parser(
        "soak", help="64 clients mixing match / get / put for 10 minutes"
    )
    parser.add_argument("--quick", action="store_true", help="20 s after 5 s warm-up")
    parser.add_argument("--clients", type=int, help="concurrent clients (64)")
    parser.add_argument("--seconds", type=float, help="measured seconds (600)")
    parser.add_argument("--dir", help="scratch directory (default: the temp dir)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.set_defaults(run=_cmd)


_TARGETS = {
    "errors": "0",
    "wrong_bytes": "0",
    "throughput_stability_ratio": ">= 0.9",
    "rss_growth_fraction": "<= 0.05",
    "leaked_reservations": "0",
    "leaked_held_slots": "0",
    "leaked_sockets": "0",
}


def _cmd(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvtier.bench.report import print_figures

    cfg = SoakConfig.quick(args.dir) if args.quick else SoakConfig(directory=args.dir)
    overrides = {"clients": args.clients, "seconds": args.seconds}
    cfg = SoakConfig(**{**vars(cfg), **{k: v for k, v in overrides.items() if v}})
    with Console(stderr=True).status("starting") as status:
        results = run_soak(cfg, status.update)
    print_figures(
        f"kvtier bench soak: {cfg.clients} clients, {cfg.seconds:g} s",
        [(k, f"{v:.4g}", _TARGETS.get(k, "")) for k, v in results.items()],
    )
    if args.json:
        print(json.dumps(results))
    return 0


# ---------------------------------------------------------------- the load


class Payloads:
    """Block (prompt, j) is a slice of one random buffer, stamped with (prompt, j):
    unique, reproducible, and cheap to make and to check (no RNG per block)."""

    def __init__(self, cfg: SoakConfig) -> None:
        self.nbytes = cfg.block_bytes
        self._base = np.random.default_rng(cfg.seed).integers(
            0, 256, 4 << 20, dtype=np.uint8
        )

    def block(self, prompt: int, j: int) -> Array:
        start = (prompt * 7919 + j * 104729) % (self._base.size - self.nbytes)
        out = self._base[start : start + self.nbytes].copy()
        out[:8] = np.frombuffer(np.array([prompt, j], np.uint32).tobytes(), np.uint8)
        return out

    def exact(self, prompt: int, j: int, got: Array) -> bool:
        return bool(np.array_equal(got, self.block(prompt, j)))


@dataclass
class _Tally:
    """What the clients saw; only the event loop's thread touches it."""

    measuring: bool = False
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {"match": [], "get": [], "put": []}
    )
    per_second: Counter[int] = field(default_factory=Counter)
    payload_bytes: int = 0
    asked_blocks: int = 0
    hit_blocks: int = 0
    errors: int = 0
    wrong_bytes: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)

    def record(self, op: str, started: float, nbytes: int = 0) -> None:
        if self.measuring:
            now = time.perf_counter()
            self.latencies[op].append(now - started)
            self.per_second[int(now)] += 1
            self.payload_bytes += nbytes


async def _client(
    address: str,
    index: int,
    cfg: SoakConfig,
    chains: list[KeyChain],
    payloads: Payloads,
    tally: _Tally,
    stop: asyncio.Event,
) -> None:
    rng = random.Random(cfg.seed * 1_000_003 + index)
    hot = list(itertools.accumulate(1.0 / (p + 1) for p in range(cfg.prompts)))
    fresh_ns = Namespace(f"kvtier-soak-{cfg.seed}-fresh-{index}", block_tokens=1)
    width = cfg.blocks_per_prompt
    fresh = itertools.count()
    shm = cfg.shm_every > 0 and index % cfg.shm_every == 0
    client = AsyncClient(address, shared_memory=shm, pool_size=1, retries=0)
    async with client:
        while not stop.is_set():
            if rng.random() < cfg.fresh_fraction:
                n = next(fresh)
                keys = block_keys(fresh_ns, list(range(n * width, (n + 1) * width)))
                prompt = (index + 1) << 24 | n  # payloads of its own
            else:
                prompt = rng.choices(range(cfg.prompts), cum_weights=hot)[0]  # Zipf
                keys = chains[prompt]
            try:
                await _one_request(client, prompt, keys, payloads, tally)
            except NodeError as exc:
                tally.errors += 1
                tally.error_kinds[type(exc).__name__] += 1


async def _one_request(
    client: AsyncClient,
    prompt: int,
    keys: KeyChain,
    payloads: Payloads,
    tally: _Tally,
) -> None:
    started = time.perf_counter()
    hit = (await client.match(keys)).num_blocks
    tally.record("match", started)
    if hit:
        started = time.perf_counter()
        got = await client.get(keys[:hit])
        tally.record("get", started, sum(g.nbytes for g in got))
        tally.wrong_bytes += sum(
            not payloads.exact(prompt, j, g) for j, g in enumerate(got)
        )
        hit = len(got)
    tally.asked_blocks += len(keys)
    tally.hit_blocks += hit
    if hit < len(keys):
        blocks = [payloads.block(prompt, j) for j in range(hit, len(keys))]
        started = time.perf_counter()
        await client.put(keys[hit:], blocks)
        tally.record("put", started, sum(b.nbytes for b in blocks))


# ---------------------------------------------------------------- the node


@dataclass
class _Samples:
    rss: list[int] = field(default_factory=list)
    anon: list[int] = field(default_factory=list)


def _memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process, bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                values[name] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["RssAnon"]


def _sockets_of(pid: int) -> int:
    """Sockets the process holds open."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except OSError:
            continue  # closed meanwhile
    return count


async def _sample(pid: int, samples: _Samples, stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss, anon = _memory_of(pid)
        samples.rss.append(rss)
        samples.anon.append(anon)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _node_idle(node: NodeProcess, timeout: float) -> tuple[dict[str, Any], int]:
    """The node's status once only our probe is connected and nothing is held, and
    the sockets it holds then (the probe's included)."""
    deadline = time.monotonic() + timeout
    while True:
        async with AsyncClient(node.address, shared_memory=False) as probe:
            status = await probe.stats()
            stats = status["stats"]
            idle = (
                status["connections"] == 1
                and stats["open_reservations"] == 0
                and stats["held_slots"] == 0
            )
            if idle or time.monotonic() > deadline:
                return status, _sockets_of(node.pid)
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- the run


def run_soak(
    cfg: SoakConfig, progress: Callable[[str], None] = lambda text: None
) -> dict[str, float]:
    """Runs the soak (module docstring) and returns its figures."""
    with tempfile.TemporaryDirectory(prefix="kvtier-soak-", dir=cfg.directory) as tmp:
        spec = NodeSpec(
            Path(tmp) / "node",
            memory=cfg.memory,
            settings=(f"disk.capacity_bytes={cfg.disk}", "server.max_connections=4096"),
        )
        with NodeProcess(spec) as node:
            progress("starting the node")
            node.start()
            return asyncio.run(_soak(node, cfg, progress))


async def _soak(
    node: NodeProcess, cfg: SoakConfig, progress: Callable[[str], None]
) -> dict[str, float]:
    ns = Namespace(f"kvtier-soak-{cfg.seed}", block_tokens=1)
    width = cfg.blocks_per_prompt
    chains = [
        block_keys(ns, list(range(p * width, (p + 1) * width)))
        for p in range(cfg.prompts)
    ]
    payloads = Payloads(cfg)
    tally = _Tally()
    samples = _Samples()
    _, sockets_before = await _node_idle(node, 10)
    stop, stop_sampling = asyncio.Event(), asyncio.Event()
    clients = [
        asyncio.create_task(
            _client(node.address, i, cfg, chains, payloads, tally, stop)
        )
        for i in range(cfg.clients)
    ]
    progress(f"warm-up, {cfg.warmup_s:g}-{cfg.max_warmup_s:g} s, until RSS settles")
    warmed_s = await _warm_up(node.pid, cfg)
    sampler = asyncio.create_task(_sample(node.pid, samples, stop_sampling))
    tally.measuring = True
    started = time.perf_counter()
    progress(f"{cfg.clients} clients for {cfg.seconds:g} s")
    await asyncio.sleep(cfg.seconds)
    elapsed = time.perf_counter() - started
    tally.measuring = False
    stop_sampling.set()
    await sampler
    stop.set()
    outcomes = await asyncio.gather(*clients, return_exceptions=True)
    crashed = [o for o in outcomes if isinstance(o, BaseException)]
    for kind, count in sorted(tally.error_kinds.items()):
        progress(f"{count} request(s) failed with {kind}")
    for error in crashed:
        progress(f"a client stopped on {type(error).__name__}: {error}")
    progress("waiting for the node to let go")
    status, sockets_after = await _node_idle(node, 30)
    leaks = {
        "leaked_reservations": status["stats"]["open_reservations"],
        "leaked_held_slots": status["stats"]["held_slots"],
        "leaked_sockets": max(0, sockets_after - sockets_before),
        "leaked_connections": status["connections"] - 1,  # the probe's
    }
    figures = _figures(cfg, tally, samples, elapsed, len(crashed))
    return {"warmup_s": warmed_s, **figures, **leaks}


async def _warm_up(pid: int, cfg: SoakConfig) -> float:
    """Waits at least ``warmup_s``, then until the node's RSS has settled (see
    :class:`SoakConfig`), at most ``max_warmup_s``; returns the seconds waited."""
    started = time.perf_counter()
    rss: list[int] = []
    window = max(1, int(cfg.settle_window_s))
    while True:
        rss.append(_memory_of(pid)[0])
        waited = time.perf_counter() - started
        if waited >= cfg.max_warmup_s:
            return waited
        if waited >= cfg.warmup_s and len(rss) > window + 5:
            before = statistics.median(rss[-window - 5 : -window + 5])
            now = statistics.median(rss[-10:])
            if now <= before * (1 + cfg.settled_fraction):
                return waited
        await asyncio.sleep(1.0)


def _figures(
    cfg: SoakConfig,
    tally: _Tally,
    samples: _Samples,
    elapsed: float,
    crashed_clients: int,
) -> dict[str, float]:
    requests = sum(len(v) for v in tally.latencies.values())
    results: dict[str, float] = {
        "clients": cfg.clients,
        "measured_s": elapsed,
        "requests_per_s": requests / elapsed,
        "payload_bytes_per_s": tally.payload_bytes / elapsed,
    }
    for op, latencies in tally.latencies.items():
        for q, name in ((50, "p50"), (99, "p99"), (99.9, "p999")):
            value = float(np.percentile(latencies, q)) * 1e3 if latencies else 0.0
            results[f"{op}_{name}_ms"] = value
    seconds = sorted(tally.per_second)[1:-1]  # whole seconds only
    third = max(1, len(seconds) // 3)
    first = statistics.mean(tally.per_second[s] for s in seconds[:third] or [0])
    last = statistics.mean(tally.per_second[s] for s in seconds[-third:] or [0])
    results["throughput_stability_ratio"] = last / first if first else 0.0
    results["hit_ratio"] = tally.hit_blocks / max(1, tally.asked_blocks)
    results["errors"] = tally.errors + crashed_clients
    results["wrong_bytes"] = tally.wrong_bytes
    results["rss_growth_fraction"] = _growth(samples.rss)
    results["anon_rss_growth_fraction"] = _growth(samples.anon)
    results["rss_end_bytes"] = samples.rss[-1] if samples.rss else 0
    return results


def _growth(values: list[int]) -> float:
    """End over start, minus 1; each the median of the first / last tenth."""
    if len(values) < 2:
        return 0.0
    tenth = max(1, len(values) // 10)
    start = statistics.median(values[:tenth])
    end = statistics.median(values[-tenth:])
    return end / start - 1.0
