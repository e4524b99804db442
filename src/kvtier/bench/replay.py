"""``kvtier bench replay``: how fast the simulator replays, per policy, and MIN.

Figures (one core, the policies of ``kvtier.core.policy`` as the store runs them):

* ``<policy>_accesses_per_s``: block accesses replayed per second at one capacity
  (target for ``lru``: >= 1,000,000);
* ``min_s``: Belady's MIN over the whole trace at that capacity (target: <= 5 s);
* ``read_s``: reading the trace file.

Each figure is the median of ``repeats`` runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvtier.bench.timing import median_time
from kvtier.sim.belady import belady
from kvtier.sim.cli import DEFAULT_POLICIES, load_trace, parse_list
from kvtier.sim.replay import ReplayConfig, replay
from kvtier.sim.trace import Trace

__all__ = ["register", "run_replay_bench"]

DEFAULT_TRACE = Path("..") / "shared" / "traces" / "conversation_trace.jsonl"
TARGETS = {"lru_accesses_per_s": ">= 1,000,000", "min_s": "<= 5"}


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Adds ``replay`` to the ``kvtier bench`` subcommands."""
    parser = subparsers.add_parser(
        "replay", parents=[common], help="replay speed per policy, and MIN's time"
    )
    parser.add_argument(
        "--trace",
        default=str(DEFAULT_TRACE) if DEFAULT_TRACE.exists() else "synthetic:chat-fast",
        help="trace to replay (default: the shared conversation trace if found)",
    )
    parser.add_argument("--capacity", type=int, default=10_000, help="blocks")
    parser.add_argument("--policy", default=",".join(DEFAULT_POLICIES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.set_defaults(
        run=_run, format="auto", block_tokens=None, skip_bad_lines=False
    )


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    trace = load_trace(args)
    read_s = time.perf_counter() - started
    policies = parse_list(args.policy, "policy")
    results = run_replay_bench(trace, policies, args.capacity, max(1, args.repeats))
    results["read_s"] = read_s
    _print(trace, args.capacity, results)
    if args.json:
        print(json.dumps(results))
    return 0


def run_replay_bench(
    trace: Trace, policies: list[str], capacity: int, repeats: int
) -> dict[str, Any]:
    """Times replays of ``trace`` at ``capacity`` blocks; see the module doc."""
    results: dict[str, Any] = {
        "num_block_accesses": trace.num_blocks,
        "capacity_blocks": capacity,
    }
    for policy in policies:
        config = ReplayConfig(capacity, policy)
        seconds = median_time(functools.partial(replay, trace, config), repeats)
        results[f"{policy}_accesses_per_s"] = trace.num_blocks / seconds
    results["min_s"] = median_time(functools.partial(belady, trace, capacity), repeats)
    return results


def _print(trace: Trace, capacity: int, results: dict[str, Any]) -> None:
    table = Table(
        title=f"kvtier bench replay: {trace.name}, {trace.num_blocks:,} block "
        f"accesses, {capacity:,} blocks (medians)"
    )
    for column in ("figure", "value", "target"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for key, value in results.items():
        if key.endswith("_per_s"):
            table.add_row(key, f"{value:,.0f}", TARGETS.get(key, ""))
        elif key.endswith("_s"):
            table.add_row(key, f"{value:.3f}", TARGETS.get(key, ""))
    Console().print(table)
