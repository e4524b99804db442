"""``kvtier demo`` and ``kvtier bench ttft``: the engine integrations at work.

    kvtier demo [--server ADDR] [--quick] [--json]
    kvtier bench ttft [--quick] [--json]

Both need torch and transformers (``pip install 'kvtier[demo]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvtier.config import Config
from kvtier.errors import ConfigError
from kvtier.server.cli import Loader

__all__ = ["register", "register_bench"]


def register(sub: Any, common: argparse.ArgumentParser, load: Loader) -> None:
    """Adds ``kvtier demo`` to the ``kvtier`` parser."""
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="serve prompts with shared prefixes without and with kvtier "
        "(a small random-weight model; nothing is downloaded)",
    )
    demo.add_argument("--server", help="use the node at host:port (engine.server)")
    demo.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    demo.add_argument("--groups", type=int, help="prompt groups sharing a prefix")
    demo.add_argument("--prompts", type=int, help="prompts per group")
    demo.add_argument("--prefix-tokens", type=int, help="tokens of each shared prefix")
    demo.add_argument("--threads", type=int, help="torch threads (default 1)")
    demo.add_argument("--quick", action="store_true", help="shorter prompts (tests)")
    demo.add_argument("--json", action="store_true", help="end with one JSON object")
    demo.set_defaults(run=lambda args: _demo(args, load))


def register_bench(bench_sub: Any) -> None:
    """Adds ``kvtier bench ttft`` to the ``kvtier bench`` parser."""
    ttft = bench_sub.add_parser(
        "ttft", help="time to first token, full kvtier hit vs no cache (CPU)"
    )
    ttft.add_argument("--quick", action="store_true", help="1k and 2k tokens only")
    ttft.add_argument("--repeats", type=int, help="runs per figure (median)")
    ttft.add_argument("--threads", type=int, help="torch threads (default 1)")
    ttft.add_argument("--json", action="store_true", help="end with one JSON object")
    ttft.set_defaults(run=_bench_ttft)


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"this command needs torch and transformers ({exc.name} is missing): "
            "pip install 'kvtier[demo]'"
        ) from exc


def _demo(args: argparse.Namespace, load: Loader) -> int:
    from dataclasses import replace

    from rich.console import Console

    from kvtier.integrations.demo import DemoConfig, run_demo, summary

    _need_torch()
    config = load(args)
    if args.server:
        config = config.replace({"engine.server": args.server})
    cfg = DemoConfig(model=args.model)
    if args.quick:
        cfg = replace(cfg, prefix_tokens=256, prompts_per_group=3)
    sizes = {"groups": args.groups, "prompts_per_group": args.prompts}
    sizes["prefix_tokens"] = args.prefix_tokens
    sizes["threads"] = args.threads
    cfg = replace(cfg, **{k: v for k, v in sizes.items() if v is not None})
    with Console(stderr=True).status("serving prompts without and with kvtier"):
        rows = run_demo(cfg, config)
    totals = summary(rows)
    _print_demo(rows, totals, config)
    if args.json:
        print(json.dumps(totals))
    return 0 if totals["identical_ratio"] == 1.0 else 1


def _print_demo(rows: list[Any], totals: dict[str, float], config: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    where = config.engine.server or f"embedded store in {config.store.data_dir}"
    table = Table(title=f"kvtier demo: TTFT without and with kvtier ({where})")
    columns = ("#", "tokens", "loaded", "TTFT no cache", "TTFT kvtier", "speedup")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("same tokens", justify="center")
    for number, row in enumerate(rows, 1):
        plain_ms, cached_ms = 1e3 * row.plain.ttft_s, 1e3 * row.cached.ttft_s
        table.add_row(
            str(number),
            str(row.prompt_tokens),
            str(row.cached.cached_tokens),
            f"{plain_ms:.1f} ms",
            f"{cached_ms:.1f} ms",
            f"{plain_ms / cached_ms:.1f}x",
            "yes" if row.same_tokens else "NO",
        )
    console = Console()
    console.print(table)
    console.print(
        f"hit ratio {totals['hit_ratio']:.1%} of prompt tokens; "
        f"mean TTFT {totals['ttft_nocache_mean_ms']:.1f} ms -> "
        f"{totals['ttft_kvtier_mean_ms']:.1f} ms; "
        f"{totals['speedup_on_hits_ratio']:.1f}x faster on hits; generated tokens "
        + ("identical" if totals["identical_ratio"] == 1.0 else "DIFFER"),
        soft_wrap=True,  # one line: scripts look for "generated tokens identical"
    )


def _bench_ttft(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from kvtier.bench.ttft import TTFTBenchConfig, run_ttft_bench

    _need_torch()
    cfg = TTFTBenchConfig.quick() if args.quick else TTFTBenchConfig()
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    with Console(stderr=True).status("bench ttft") as status:
        results = run_ttft_bench(cfg, lambda text: status.update(text))
    table = Table(title="kvtier bench ttft (CPU, medians)")
    for column in ("prompt tokens", "no cache", "full hit", "of which load", "speedup"):
        table.add_column(column, justify="right")
    for tokens in cfg.prompt_tokens:
        table.add_row(
            str(tokens),
            f"{results[f'ttft_nocache_{tokens}_ms']:.1f} ms",
            f"{results[f'ttft_hit_{tokens}_ms']:.1f} ms",
            f"{results[f'load_{tokens}_ms']:.1f} ms",
            f"{results[f'speedup_{tokens}_ratio']:.1f}x",
        )
    Console().print(table)
    if args.json:
        print(json.dumps(results))
    sys.stdout.flush()
    return 0
