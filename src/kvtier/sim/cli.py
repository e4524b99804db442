"""``kvtier replay``: what each capacity and policy would have hit on a trace.

Wired into the ``kvtier`` command by :func:`register`; nothing here imports
``kvtier.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from kvtier.core.policy import POLICIES
from kvtier.errors import ConfigError
from kvtier.sim.cluster import ROUTINGS, replay_cluster
from kvtier.sim.optimize import Sweep, recommend, sweep
from kvtier.sim.readers import TRACE_FORMATS, read_trace
from kvtier.sim.replay import (
    DEFAULT_BLOCK_BYTES,
    ReplayConfig,
    ReplayResult,
    default_policy,
)
from kvtier.sim.report import (
    cluster_table,
    plot_sweep,
    recommendation_table,
    sweep_rows,
    sweep_table,
    write_csv,
)
from kvtier.sim.synth import synthetic_trace
from kvtier.sim.trace import Trace

__all__ = ["DEFAULT_CAPACITIES", "load_trace", "parse_list", "register"]

DEFAULT_CAPACITIES = "1000,5000,10000,20000,50000"
# weighted_lru ranks every key per eviction call: at exact capacity a sweep would
# take hours, so it runs only when named.
DEFAULT_POLICIES = [name for name in POLICIES if name != "weighted_lru"]
SYNTHETIC_PREFIX = "synthetic:"


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Adds ``replay`` to the ``kvtier`` command's subcommands."""
    parser = subparsers.add_parser(
        "replay",
        parents=[common],
        help="replay a request trace: hit ratio per capacity and policy, vs MIN",
        description="Replays a trace (Mooncake JSONL, kvtier-trace JSONL, a kvtier "
        "access log, or synthetic:NAME[:SEED]) through the store's eviction policies "
        "at each capacity, and through Belady's MIN.",
    )
    parser.add_argument("trace", metavar="TRACE", help="trace file or synthetic:NAME")
    parser.add_argument(
        "--capacity",
        default=DEFAULT_CAPACITIES,
        help="capacities in blocks, comma separated",
    )
    parser.add_argument(
        "--policy",
        default=",".join(DEFAULT_POLICIES),
        help=f"policies, comma separated, or 'all' (default: all but weighted_lru); "
        f"the store's default is {default_policy()}",
    )
    parser.add_argument("--format", default="auto", choices=TRACE_FORMATS)
    parser.add_argument(
        "--block-tokens", type=int, help="tokens per block of the trace"
    )
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="skip and count malformed lines"
    )
    parser.add_argument(
        "--disk-capacity",
        type=int,
        default=0,
        help="blocks of a disk tier below memory",
    )
    parser.add_argument(
        "--write-policy",
        default="write_behind",
        choices=("write_through", "write_behind", "write_back"),
    )
    parser.add_argument("--high-watermark", type=float, default=1.0)
    parser.add_argument("--low-watermark", type=float, default=1.0)
    parser.add_argument(
        "--block-bytes",
        type=int,
        default=DEFAULT_BLOCK_BYTES,
        help="bytes per block (bytes-written figures)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=60.0,
        help="seconds per point of hit ratio over time",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="also compare N nodes: random, prefix-aware routing, pooled",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random routing")
    parser.add_argument(
        "--target-hit-ratio",
        type=float,
        help="recommend the smallest capacity that reaches it",
    )
    parser.add_argument(
        "--hints",
        action="store_true",
        help="replay as an engine passing finish hints would (conversations over, "
        "partial last blocks), taken from the trace",
    )
    parser.add_argument("--no-min", action="store_true", help="skip Belady's MIN")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.add_argument(
        "--csv", metavar="FILE", help="write one row per policy and capacity"
    )
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots there")
    parser.set_defaults(run=run_replay)


def parse_list(text: str, name: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--{name} needs at least one value")
    return items


def _capacities(text: str) -> list[int]:
    try:
        capacities = [
            int(item.replace("_", "")) for item in parse_list(text, "capacity")
        ]
    except ValueError as exc:
        raise ConfigError(f"--capacity takes integers (blocks), got {text!r}") from exc
    if any(c < 0 for c in capacities):
        raise ConfigError(f"--capacity takes integers >= 0, got {text!r}")
    return capacities


def _policies(text: str) -> list[str]:
    names = list(POLICIES) if text == "all" else parse_list(text, "policy")
    for name in names:
        if name not in POLICIES:
            raise ConfigError(
                f"--policy must name policies of {list(POLICIES)}, got {name!r}"
            )
    return names


def load_trace(args: argparse.Namespace) -> Trace:
    """The trace ``args.trace`` names: a file, or ``synthetic:NAME[:SEED]``."""
    if args.trace.startswith(SYNTHETIC_PREFIX):
        name, _, seed = args.trace.removeprefix(SYNTHETIC_PREFIX).partition(":")
        return synthetic_trace(name, int(seed or 0))
    return read_trace(
        args.trace,
        trace_format=args.format,
        block_tokens=args.block_tokens,
        skip_bad_lines=args.skip_bad_lines,
    )


def run_replay(args: argparse.Namespace) -> int:
    capacities, policies = _capacities(args.capacity), _policies(args.policy)
    trace = load_trace(args)
    base = ReplayConfig(
        0,
        disk_capacity_blocks=args.disk_capacity,
        block_bytes=args.block_bytes,
        high_watermark=args.high_watermark,
        low_watermark=args.low_watermark,
        write_policy=args.write_policy,
        window_s=args.window,
        hints=args.hints,
    )
    err = Console(stderr=True)
    err.print(_describe(trace), highlight=False, soft_wrap=True)
    with _ProgressBar(err) as bar:
        swept = sweep(trace, capacities, policies, base, bar.update, not args.no_min)
        recs = recommend(trace, swept, args.target_hit_ratio, base)
        clusters = _clusters(trace, args, base, capacities, policies, bar)
    _print(swept, recs, clusters, args.nodes)
    if args.csv:
        write_csv(sweep_rows(swept), args.csv)
    if args.plot:
        for path in plot_sweep(swept, args.plot):
            err.print(f"wrote {path}", highlight=False)
    if args.json:
        print(json.dumps(_summary(swept, recs, clusters, args.nodes, args.hints)))
    return 0


def _describe(trace: Trace) -> str:
    skipped = (
        f", {trace.num_bad_lines:,} bad lines skipped" if trace.num_bad_lines else ""
    )
    return (
        f"{trace.name}: {len(trace):,} requests, {trace.num_blocks:,} block accesses, "
        f"{trace.num_unique_blocks:,} distinct blocks of {trace.block_tokens} tokens, "
        f"{trace.duration_s / 60:.1f} min{skipped}"
    )


def _clusters(
    trace: Trace,
    args: argparse.Namespace,
    base: ReplayConfig,
    capacities: list[int],
    policies: list[str],
    bar: _ProgressBar,
) -> dict[int, dict[str, ReplayResult]]:
    if args.nodes <= 0:
        return {}
    policy = default_policy() if default_policy() in policies else policies[0]
    out: dict[int, dict[str, ReplayResult]] = {}
    for capacity in capacities:
        config = dataclasses.replace(base, capacity_blocks=capacity, policy=policy)
        out[capacity] = {}
        for routing in ROUTINGS:
            label = f"{args.nodes} nodes, {routing} @ {capacity:,}"
            bar.update(label, 0, len(trace))
            out[capacity][routing] = replay_cluster(
                trace, config, args.nodes, routing, seed=args.seed,
                progress=functools.partial(bar.update, label, total=len(trace)),
            )  # fmt: skip
    return out


def _print(
    swept: Sweep,
    recs: list[Any],
    clusters: dict[int, dict[str, ReplayResult]],
    num_nodes: int,
) -> None:
    # Tables keep their columns when piped to a file (rich would assume 80 columns).
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    console.print(sweep_table(swept, default_policy()))
    console.print(recommendation_table(recs))
    for results in clusters.values():
        console.print(cluster_table(results, num_nodes))


def _summary(
    swept: Sweep,
    recs: list[Any],
    clusters: dict[int, dict[str, ReplayResult]],
    num_nodes: int,
    hints: bool,
) -> dict[str, Any]:
    summary = swept.as_json()
    summary["hints"] = hints
    summary["recommendations"] = {
        rec.policy: {
            "target_hit_ratio": rec.target_hit_ratio,
            "capacity_blocks": rec.capacity_blocks,
            "knee_blocks": rec.knee_blocks,
        }
        for rec in recs
    }
    if clusters:
        summary["cluster"] = {
            "nodes": num_nodes,
            "capacity_per_node": {
                str(c): {routing: r.hit_ratio for routing, r in by_routing.items()}
                for c, by_routing in clusters.items()
            },
        }
    return summary


class _ProgressBar:
    """One rich progress bar on stderr that each replay of a sweep takes over."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,} requests"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> _ProgressBar:
        self._progress.__enter__()
        self._task = self._progress.add_task("replay", total=1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, label: str, done: int, total: int) -> None:
        assert self._task is not None, "update() inside the with block"
        self._progress.update(
            self._task, description=label, completed=done, total=total
        )
