"""The ``kvtier route`` and ``kvtier bench route`` commands.

    kvtier route [--listen HOST:PORT] [--pod ID,MODEL,ENDPOINT[,REPLAY]]...
                 [--bind ENDPOINT] [--store URL]
    kvtier bench route [--quick] [--json] [--repeats N]

Registered into the ``kvtier`` parser by :func:`register`; the heavy imports (zmq,
aiohttp, numpy work) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rich.console import Console

from kvtier.config import Config
from kvtier.errors import ConfigError

__all__ = ["register"]

LoadConfig = Callable[[argparse.Namespace], Config]


def register(
    commands: Any, benches: Any, common: argparse.ArgumentParser, load: LoadConfig
) -> None:
    """Adds ``route`` to ``commands`` and ``route`` to ``benches``.

    Args:
        commands: The ``kvtier`` subparsers.
        benches: The ``kvtier bench`` subparsers.
        common: Parent parser of the shared flags (--config, --set, -v).
        load: Resolves the configuration from the parsed shared flags.
    """
    route = commands.add_parser(
        "route",
        parents=[common],
        help="KV-aware router: engine KV events in, the best pod for a prompt out",
    )
    route.add_argument(
        "--listen", metavar="HOST:PORT", help="HTTP address (router.listen)"
    )
    route.add_argument(
        "--pod",
        metavar="ID,MODEL,ENDPOINT[,REPLAY]",
        action="append",
        default=[],
        help="follow a pod's KV events (repeatable), e.g. "
        "--pod a,meta-llama/Llama-3.1-8B,tcp://10.0.0.7:5557,tcp://10.0.0.7:5558",
    )
    route.add_argument("--bind", metavar="ENDPOINT", help="router.bind_endpoint")
    route.add_argument("--store", metavar="URL", help="router.store_url")
    route.set_defaults(run=lambda args: _cmd_route(args, load))

    bench = benches.add_parser(
        "route", parents=[common], help="event ingestion, route latency, index memory"
    )
    bench.add_argument("--quick", action="store_true", help="smaller sizes (~20 s)")
    bench.add_argument("--json", action="store_true", help="end with one JSON object")
    bench.add_argument("--repeats", type=int, help="runs per figure (median reported)")
    bench.set_defaults(run=_cmd_bench_route)


def _cmd_route(args: argparse.Namespace, load: LoadConfig) -> int:
    from kvtier.router.service import serve

    config = load(args)
    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["router.listen"] = args.listen
    if args.bind:
        overrides["router.bind_endpoint"] = args.bind
    if args.store:
        overrides["router.store_url"] = args.store
    if args.pod:
        pods = {k: asdict(v) for k, v in config.router.pods.items()}
        pods.update(_pod_flag(text) for text in args.pod)
        overrides["router.pods"] = pods
    asyncio.run(serve(config.replace(overrides)))
    return 0


def _pod_flag(text: str) -> tuple[str, dict[str, str]]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4) or not all(parts):
        raise ConfigError(
            f"--pod needs ID,MODEL,ENDPOINT[,REPLAY_ENDPOINT], got {text!r}"
        )
    pod = {"model": parts[1], "endpoint": parts[2]}
    if len(parts) == 4:
        pod["replay_endpoint"] = parts[3]
    return parts[0], pod


def _cmd_bench_route(args: argparse.Namespace) -> int:
    from kvtier.bench.route import RouteBenchConfig, run_route_bench

    cfg = RouteBenchConfig.quick() if args.quick else RouteBenchConfig()
    if args.repeats:
        cfg = RouteBenchConfig(**{**asdict(cfg), "repeats": args.repeats})
    console = Console(stderr=True)
    results = run_route_bench(cfg, lambda label: console.print(f"[dim]{label}[/]"))
    _print_table(results)
    if args.json:
        print(json.dumps(results))
    return 0


_TARGETS = {
    "ingest_blocks_per_s": ("engine blocks ingested per s, one core", ">= 200,000"),
    "ingest_zmq_blocks_per_s": ("  the same, through ZMQ from a publisher", "report"),
    "route_p50_ms": ("route p50, 32k tokens, 64 pods (ms)", "report"),
    "route_p99_ms": ("route p99, 32k tokens, 64 pods (ms)", "<= 2"),
    "route_cpu_p50_ms": ("  CPU time of a route, p50 (ms)", "report"),
    "route_cpu_p99_ms": ("  CPU time of a route, p99 (ms)", "report"),
    "route_http_p50_ms": ("  through HTTP, token_ids JSON list, p50 (ms)", "report"),
    "route_http_p99_ms": ("  through HTTP, token_ids JSON list, p99 (ms)", "report"),
    "route_http_b64_p50_ms": ("  through HTTP, token_ids_b64, p50 (ms)", "report"),
    "route_http_b64_p99_ms": ("  through HTTP, token_ids_b64, p99 (ms)", "report"),
    "index_bytes_per_million_blocks": ("global index, per 1M (pod, block)", "report"),
    "ingest_bytes_per_million_engine_blocks": (
        "whole pod state, per 1M engine blocks",
        "report",
    ),
}


def _print_table(results: dict[str, float]) -> None:
    from kvtier.bench.report import print_figures

    rows = [
        (label, _shown(key, results[key]), target)
        for key, (label, target) in _TARGETS.items()
        if key in results
    ]
    print_figures("kvtier bench route (medians)", rows)


def _shown(key: str, value: float) -> str:
    if "bytes" in key:
        return f"{value / 2**20:,.1f} MiB"
    if key.endswith("_per_s"):
        return f"{value:,.0f}"
    return f"{value:,.3f}"
