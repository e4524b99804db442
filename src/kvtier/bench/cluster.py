"""``kvtier bench cluster``: placement quality, cluster throughput, failure detection.

* placement balance: the busiest node's share of 100,000 keys over the mean, for 3 and
  10 nodes (target <= 1.1);
* movement: the fraction of keys whose primary changes when a fourth node joins three
  (ideal 0.25);
* throughput: aggregate put and get with 1 and 3 nodes on loopback, through a
  ClusterClient (a 2-core machine makes the scaling figure indicative only);
* failure detection: seconds from SIGKILL of a node to clients seeing it gone (target
  lease TTL + 1 s).

It starts a one-member etcd (the Debian ``etcd`` binary) and its own nodes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.timing import free_port
from kvtier.core.placement import Member, Placement

__all__ = ["register", "run_cluster_bench"]

_LEASE_TTL = 2


def register(bench_sub: Any) -> None:
    parser = bench_sub.add_parser(
        "cluster", help="placement balance and movement, throughput, failure detection"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.set_defaults(run=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    with console.status("starting") as status:
        results = run_cluster_bench(args.quick, lambda t: status.update(t))
    table = Table(title="kvtier bench cluster (medians)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    targets = {
        "balance_3_nodes_ratio": "<= 1.1",
        "balance_10_nodes_ratio": "<= 1.1",
        "moved_on_join_fraction": "~0.25",
        "dead_node_noticed_s": f"<= {_LEASE_TTL + 1}",
    }
    for key, value in results.items():
        shown = (
            f"{value / (1 << 20):.0f} MiB/s"
            if key.endswith("bytes_per_s")
            else (f"{value:.3f}")
        )
        table.add_row(key, shown, targets.get(key, ""))
    Console().print(table)
    if args.json:
        print(json.dumps(results))
    return 0


def run_cluster_bench(quick: bool, progress: Callable[[str], None]) -> dict[str, float]:
    progress("placement balance and movement")
    results = placement_figures(100_000)
    with (
        tempfile.TemporaryDirectory(prefix="kvtier-bench-") as scratch,
        _etcd(Path(scratch)) as endpoint,
    ):
        for count in (1, 3):
            progress(f"throughput with {count} node(s)")
            with _nodes(Path(scratch) / f"t{count}", endpoint, count) as (name, _):
                results.update(_throughput(endpoint, name, count, quick))
        progress("failure detection")
        with _nodes(Path(scratch) / "f", endpoint, 3) as (name, procs):
            results["dead_node_noticed_s"] = _detection(endpoint, name, procs)
    return results


def placement_figures(num_keys: int) -> dict[str, float]:
    keys = [os.urandom(16) for _ in range(num_keys)]
    figures: dict[str, float] = {}
    for nodes in (3, 10):
        placement = Placement([Member(f"n{i}") for i in range(nodes)])
        counts = collections.Counter(r[0] for r in placement.replicas(keys, 1))
        figures[f"balance_{nodes}_nodes_ratio"] = max(counts.values()) / (
            num_keys / nodes
        )
    before = Placement([Member(f"n{i}") for i in range(3)]).replicas(keys, 1)
    after = Placement([Member(f"n{i}") for i in range(4)]).replicas(keys, 1)
    moved = sum(b[0] != a[0] for b, a in zip(before, after, strict=True))
    figures["moved_on_join_fraction"] = moved / num_keys
    return figures


@contextlib.contextmanager
def _etcd(base: Path) -> Iterator[str]:
    client, peer = free_port(), free_port()
    proc = subprocess.Popen(
        [
            "etcd",
            "--name",
            "b0",
            "--data-dir",
            str(base / "etcd"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"b0=http://127.0.0.1:{peer}",
            "--log-level",
            "error",
            "--logger",
            "zap",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: socket.create_connection(("127.0.0.1", client), 1).close(), 10)
        yield f"127.0.0.1:{client}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait(probe: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextlib.contextmanager
def _nodes(base: Path, etcd: str, count: int) -> Iterator[tuple[str, list[Any]]]:
    from kvtier.client import ClusterClient

    name = f"bench{uuid.uuid4().hex[:6]}"
    procs = []
    try:
        for i in range(count):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "kvtier.cli",
                        "serve",
                        "--data-dir",
                        str(base / f"n{i}"),
                        "--port",
                        str(free_port()),
                        "--http-port",
                        "0",
                        "--grpc-port",
                        "0",
                        "--memory",
                        "1GiB",
                        "--cluster",
                        name,
                        "--etcd",
                        etcd,
                        "--set",
                        f"cluster.lease_ttl={_LEASE_TTL}",
                        "--set",
                        "disk.enabled=false",
                        "--set",
                        f"server.node_id=n{i}",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        def all_joined() -> None:
            with ClusterClient(etcd, name) as client:
                assert len(client.nodes) == count

        _wait(all_joined, 60)
        yield name, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=60)


def _throughput(etcd: str, name: str, count: int, quick: bool) -> dict[str, float]:
    from kvtier import Namespace, block_keys
    from kvtier.client import ClusterClient

    num, size = (64, 256 << 10) if quick else (256, 256 << 10)
    blocks = [
        np.random.default_rng(i).integers(0, 256, size, np.uint8) for i in range(16)
    ]
    keys = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(num)))
    with ClusterClient(etcd, name) as client:
        client.ping()  # connect to every node before the clock starts
        started = time.perf_counter()
        for i in range(0, num, 16):
            client.put(keys[i : i + 16], blocks[: len(keys[i : i + 16])])
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(0, num, 16):
            client.get(keys[i : i + 16])
        get_s = time.perf_counter() - started
    total = num * size
    return {
        f"put_{count}_nodes_bytes_per_s": total / put_s,
        f"get_{count}_nodes_bytes_per_s": total / get_s,
    }


def _detection(etcd: str, name: str, procs: list[Any]) -> float:
    from kvtier.client import ClusterClient

    with ClusterClient(etcd, name) as client:
        procs[1].send_signal(signal.SIGKILL)
        started = time.monotonic()
        while len(client.nodes) == len(procs):
            time.sleep(0.01)
        return time.monotonic() - started
