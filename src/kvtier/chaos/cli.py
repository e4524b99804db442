"""``kvtier chaos ...``: the reliability harnesses, runnable by anyone.

kvtier chaos crash [--cycles N] [--seed S] [--dir D] [--json]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Adds ``kvtier chaos`` and its harnesses to the ``kvtier`` parser."""
    chaos = sub.add_parser("chaos", help="break a real node on purpose and verify it")
    chaos_sub = chaos.add_subparsers(title="harnesses", metavar="HARNESS")
    crash = chaos_sub.add_parser(
        "crash", help="SIGKILL a node mid-load, restart, verify every block"
    )
    crash.add_argument("--cycles", type=int, default=200, help="kill-restart cycles")
    crash.add_argument("--seed", type=int, default=0, help="seeds load and kill times")
    crash.add_argument("--dir", help="scratch directory (default: the system temp dir)")
    crash.add_argument("--json", action="store_true", help="end with one JSON object")
    crash.set_defaults(run=_crash)
    faults = chaos_sub.add_parser(
        "faults", help="EIO, ENOSPC, torn writes, latency, network faults; recovery"
    )
    faults.add_argument("--blocks", type=int, default=400, help="blocks per phase")
    faults.add_argument("--seconds", type=float, default=20.0, help="network phase")
    faults.add_argument("--seed", type=int, default=0, help="seeds faults and load")
    faults.add_argument("--dir", help="scratch directory (default: the temp dir)")
    faults.add_argument("--json", action="store_true", help="end with one JSON object")
    faults.set_defaults(run=_faults)


def _faults(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvtier.chaos.faultrun import FaultRunConfig, run_faults

    cfg = FaultRunConfig(args.blocks, args.seconds, args.seed, args.dir)
    with Console(stderr=True).status("starting") as status:
        report = run_faults(cfg, status.update)
    return _print("kvtier chaos faults", report.figures(), report.violations, args.json)


def _print(
    title: str, figures: dict[str, float], violations: list[str], as_json: bool
) -> int:
    from kvtier.bench.report import print_figures

    targets = {"violations": "0"}
    print_figures(
        title, [(k, f"{v:g}", targets.get(k, "")) for k, v in figures.items()]
    )
    for violation in violations:
        print(f"violation: {violation}")
    if as_json:
        print(json.dumps(figures))
    return 1 if violations else 0


def _crash(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvtier.chaos.crash import CrashConfig, run_crash

    cfg = CrashConfig(cycles=args.cycles, seed=args.seed, directory=args.dir)
    with Console(stderr=True).status("starting") as status:
        report = run_crash(
            cfg, lambda cycle: status.update(f"cycle {cycle + 1} of {cfg.cycles}")
        )
    return _print("kvtier chaos crash", report.figures(), report.violations, args.json)
