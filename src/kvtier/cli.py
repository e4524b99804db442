"""The ``kvtier`` command.

    kvtier serve                run a node (kvtier.server)
    kvtier put/get/ls/rm/stats  talk to a node (--server ADDR)
    kvtier info                 configuration, tiers and their usage
    kvtier config               the resolved configuration (YAML), or --markdown docs
    kvtier check [--fix]        audit a stopped node's data offline, and repair it
    kvtier replay TRACE         hit ratio per capacity and policy on a trace, vs MIN
    kvtier bench store          the embedded store against same-run baselines
    kvtier route                KV-aware router for inference pods (kvtier.router.cli)
    kvtier bench route          event ingestion, route latency, index memory
    kvtier bench server         a node against raw sockets, memcpy, Redis and gRPC
    kvtier cluster ...          a cluster's status, settings and quotas (etcd)
    kvtier bench cluster        placement balance and movement, throughput, failure
    kvtier bench replay         replay speed per policy, and MIN's time
    kvtier demo                 prompts with shared prefixes, without and with kvtier
    kvtier bench ttft           time to first token, full hit vs no cache
    kvtier chaos crash|faults   kill a node mid-load, inject faults; verify every block
    kvtier bench soak           64 clients mixing match / get / put, leaks and RSS

Every command takes ``--config FILE`` and ``--set section.key=value`` (repeatable);
``KVTIER_*`` environment variables sit between the two.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence

import yaml
from rich.console import Console
from rich.table import Table

from kvtier import __version__
from kvtier.config import Config, load_config, render_markdown
from kvtier.errors import ConfigError, KVTierError
from kvtier.results import jsonable

log = logging.getLogger("kvtier")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvtier`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KVTierError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="A tiered store for the attention KV cache of LLM inference.",
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML configuration file")
    common.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        help="override one configuration key (repeatable), e.g. "
        "--set memory.capacity_bytes=8GiB",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # commands that read no configuration (the benches, replay) take -v alone
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    info = sub.add_parser("info", parents=[common], help="configuration, tiers, usage")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=_cmd_info)

    config = sub.add_parser("config", parents=[common], help="the resolved config")
    config.add_argument(
        "--markdown", action="store_true", help="document every key as Markdown"
    )
    config.set_defaults(run=_cmd_config)

    check = sub.add_parser(
        "check",
        parents=[common],
        help="audit a stopped node's data offline: disk index vs segment files, "
        "every record's checksum, shared directories",
    )
    check.add_argument(
        "--fix",
        action="store_true",
        help="repair: rebuild a broken index, drop bad rows, quarantine bad files",
    )
    check.set_defaults(run=_cmd_check)

    from kvtier.server.cli import register as register_server

    register_server(sub, common, _load)
    from kvtier.cluster.cli import register as register_cluster

    register_cluster(sub)
    from kvtier.sim.cli import register as register_replay

    register_replay(sub, verbose)
    from kvtier.integrations.cli import register as register_demo

    register_demo(sub, common, _load)
    from kvtier.chaos.cli import register as register_chaos

    register_chaos(sub)

    bench = sub.add_parser("bench", help="benchmarks against same-run baselines")
    bench_sub = bench.add_subparsers(title="benchmarks", metavar="BENCH")
    store = bench_sub.add_parser(
        "store", parents=[verbose], help="memory and disk tiers, reopen, keys + match"
    )
    store.add_argument("--quick", action="store_true", help="smaller sizes (~20 s)")
    store.add_argument("--json", action="store_true", help="end with one JSON object")
    store.add_argument("--dir", help="scratch directory (default: the system temp dir)")
    store.add_argument("--repeats", type=int, help="runs per figure (median reported)")
    store.set_defaults(run=_cmd_bench_store)
    from kvtier.bench.server import register as register_bench_server

    register_bench_server(bench_sub)
    from kvtier.bench.cluster import register as register_bench_cluster

    register_bench_cluster(bench_sub)
    from kvtier.bench.soak import register as register_bench_soak

    register_bench_soak(bench_sub)
    from kvtier.router.cli import register as register_router

    register_router(sub, bench_sub, common, _load)
    from kvtier.bench.replay import register as register_bench_replay

    register_bench_replay(bench_sub, verbose)
    from kvtier.integrations.cli import register_bench as register_bench_ttft

    register_bench_ttft(bench_sub)
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set needs SECTION.KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return load_config(args.config, overrides=overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(render_markdown())
        return 0
    sys.stdout.write(yaml.safe_dump(_load(args).as_dict(), sort_keys=False))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from kvtier.store import TieredStore

    config = _load(args)
    with TieredStore(config) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps({"config": config.as_dict(), "stats": jsonable(stats)}))
        return 0
    console = Console()
    console.print(f"kvtier {__version__}: data in [bold]{config.store.data_dir}[/]")
    table = Table(title="tiers")
    for column in ("tier", "capacity", "used", "blocks", "utilization"):
        table.add_column(column, justify="right" if column != "tier" else "left")
    for tier in stats.tiers.values():
        utilization = (
            tier.used_bytes / tier.capacity_bytes if tier.capacity_bytes else 0
        )
        table.add_row(
            tier.name,
            _human(tier.capacity_bytes),
            _human(tier.used_bytes),
            f"{tier.num_blocks:,}",
            f"{utilization:.1%}",
        )
    console.print(table)
    console.print(
        f"write policy {config.store.write_policy}, "
        f"memory policy {config.memory.policy}, disk policy {config.disk.policy}, "
        f"block_tokens {config.store.block_tokens}"
    )
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from kvtier.tiers.audit import audit_data_dir

    report = audit_data_dir(_load(args), fix=args.fix)
    print(json.dumps({"ok": report.ok, **jsonable(report)}, indent=2))
    return 0 if args.fix or report.ok else 1


def _cmd_bench_store(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from kvtier.bench.store import StoreBenchConfig, run_store_bench

    cfg = (
        StoreBenchConfig.quick(args.dir)
        if args.quick
        else StoreBenchConfig(directory=args.dir)
    )
    if args.repeats:
        cfg = StoreBenchConfig(**{**vars(cfg), "repeats": args.repeats})
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("bench store", total=5)

        def step(label: str) -> None:
            if progress.tasks[0].description != "bench store":
                progress.advance(task)
            progress.update(task, description=label)

        results = run_store_bench(cfg, step)
    _print_store_table(results)
    if args.json:
        print(json.dumps(results))
    return 0


_TARGETS = {
    "memory_put_ratio": ("memory put vs numpy.copyto", ">= 0.9"),
    "memory_get_ratio": ("memory get vs numpy.copyto", ">= 0.9"),
    "disk_write_nofsync_ratio": ("disk write vs sequential write", ">= 0.8"),
    "disk_write_fsync_ratio": ("disk write vs sequential write, fsync", ">= 0.8"),
    "disk_cold_read_ratio": ("disk cold read vs sequential read", ">= 0.8"),
    "reopen_first_get_s": ("reopen + first get (s)", "<= 2"),
    "keys_match_128k_ms": ("keys + prefix match, 128k tokens (ms)", "<= 2"),
    "keys_128k_ms": ("keys only, 128k tokens from numpy (ms)", "report"),
    "keys_128k_from_list_ms": ("keys only, 128k tokens from a list (ms)", "report"),
}


def _print_store_table(results: dict[str, float]) -> None:
    from kvtier.bench.report import print_figures

    rows = [
        (label, f"{results[key]:.3f}", target)
        for key, (label, target) in _TARGETS.items()
        if key in results
    ]
    rows += [
        (key.removesuffix("_bytes_per_s"), f"{_human(value)}/s", "")
        for key, value in results.items()
        if key.endswith("_bytes_per_s")
    ]
    print_figures("kvtier bench store (medians)", rows)


def _human(nbytes: float) -> str:
    if nbytes < 1024:
        return f"{nbytes:.0f} B"
    exponent = min(int(math.log(nbytes, 1024)), 5)
    return f"{nbytes / 1024**exponent:.1f} {'BKMGTP'[exponent]}iB".replace("BiB", "B")


if __name__ == "__main__":
    sys.exit(main())
