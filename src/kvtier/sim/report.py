"""What a sweep looks like: terminal tables, CSV rows, PNG plots.

Plots need matplotlib (the ``sim`` extra); it is imported only when a plot is asked
for, with the non-interactive Agg backend, so replays run on servers without it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from kvtier.errors import ConfigError
from kvtier.sim.optimize import Recommendation, Sweep
from kvtier.sim.replay import ReplayResult

__all__ = [
    "CSV_COLUMNS",
    "cluster_table",
    "plot_sweep",
    "recommendation_table",
    "sweep_rows",
    "sweep_table",
    "write_csv",
]

CSV_COLUMNS = (
    "trace",
    "policy",
    "capacity_blocks",
    "disk_capacity_blocks",
    "hit_ratio",
    "min_ratio",
    "token_hit_ratio",
    "prefill_tokens_saved",
    "memory_bytes_written",
    "disk_bytes_written",
    "memory_evictions",
    "disk_evictions",
)


def sweep_rows(swept: Sweep) -> list[dict[str, Any]]:
    """One row per (policy, capacity), MIN included, with :data:`CSV_COLUMNS`."""
    rows = []
    for capacity in swept.capacities:
        if capacity in swept.bounds:
            rows.append(_row(swept, "min", swept.bounds[capacity], 1.0))
        for policy, by_capacity in swept.results.items():
            ratio = swept.min_ratio(policy, capacity)
            rows.append(_row(swept, policy, by_capacity[capacity], ratio))
    return rows


def _row(
    swept: Sweep, policy: str, r: ReplayResult, min_ratio: float | None
) -> dict[str, Any]:
    written, evicted = r.bytes_written, r.evictions
    return {
        "trace": swept.trace_name,
        "policy": policy,
        "capacity_blocks": r.capacity_blocks,
        "disk_capacity_blocks": r.disk_capacity_blocks,
        "hit_ratio": r.hit_ratio,
        "min_ratio": min_ratio,
        "token_hit_ratio": r.token_hit_ratio,
        "prefill_tokens_saved": r.hit_tokens,
        "memory_bytes_written": written.get("memory", 0),
        "disk_bytes_written": written.get("disk", 0),
        "memory_evictions": evicted.get("memory", 0),
        "disk_evictions": evicted.get("disk", 0),
    }


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Writes ``rows`` (of :func:`sweep_rows`) as CSV with a header."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def sweep_table(swept: Sweep, default: str) -> Table:
    """Hit ratio and fraction of MIN per policy (rows) and capacity (columns)."""
    table = Table(title=f"{swept.trace_name}: block hit ratio (fraction of MIN)")
    table.add_column("policy")
    for capacity in swept.capacities:
        table.add_column(f"{capacity:,} blocks", justify="right")
    if swept.bounds:
        table.add_row(
            "MIN (bound)",
            *(f"{swept.bounds[c].hit_ratio:.3f}" for c in swept.capacities),
        )
    for policy, by_capacity in swept.results.items():
        label = f"{policy} (default)" if policy == default else policy
        cells = []
        for capacity in swept.capacities:
            cell = f"{by_capacity[capacity].hit_ratio:.3f}"
            fraction = swept.min_ratio(policy, capacity)
            if fraction is not None:
                cell += f" ({fraction:.2f})"
            cells.append(cell)
        table.add_row(label, *cells)
    return table


def recommendation_table(recommendations: Sequence[Recommendation]) -> Table:
    table = Table(title="sizing")
    for column in ("policy", "smallest capacity for target", "knee of the curve"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for rec in recommendations:
        if rec.target_hit_ratio is None:
            smallest = "-"
        elif rec.capacity_blocks is None:
            smallest = f"unreachable ({rec.target_hit_ratio:.2f})"
        else:
            smallest = f"{rec.capacity_blocks:,} blocks ({rec.target_hit_ratio:.2f})"
        knee = "-" if rec.knee_blocks is None else f"{rec.knee_blocks:,} blocks"
        table.add_row(rec.policy, smallest, knee)
    return table


def cluster_table(results: dict[str, ReplayResult], num_nodes: int) -> Table:
    """Hit ratios of the routings (random, prefix, pooled) side by side."""
    table = Table(title=f"cluster of {num_nodes} nodes")
    for column in ("routing", "capacity per node", "hit ratio", "token hit ratio"):
        table.add_column(column, justify="left" if column == "routing" else "right")
    for routing, result in results.items():
        table.add_row(
            routing,
            f"{result.capacity_blocks:,}",
            f"{result.hit_ratio:.3f}",
            f"{result.token_hit_ratio:.3f}",
        )
    return table


def plot_sweep(swept: Sweep, directory: str | os.PathLike[str]) -> list[Path]:
    """Writes ``hit_ratio_vs_capacity.png`` and ``hit_ratio_over_time_<C>.png``.

    Returns:
        The files written.

    Raises:
        ConfigError: matplotlib is not installed (``pip install kvtier[sim]``).
    """
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_plot_capacity(plt, swept, out / "hit_ratio_vs_capacity.png")]
    for capacity in swept.capacities:
        path = out / f"hit_ratio_over_time_{capacity}.png"
        paths.append(_plot_time(plt, swept, capacity, path))
    return paths


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("plots need matplotlib: pip install 'kvtier[sim]'") from exc
    return plt


def _plot_capacity(plt: Any, swept: Sweep, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    if swept.bounds:
        bound = [swept.bounds[c].hit_ratio for c in swept.capacities]
        ax.plot(swept.capacities, bound, "k--", marker="o", label="MIN (bound)")
    for policy, by_capacity in swept.results.items():
        ratios = [by_capacity[c].hit_ratio for c in swept.capacities]
        ax.plot(swept.capacities, ratios, marker="o", label=policy)
    ax.set_xscale("log")
    title = f"{swept.trace_name}: hit ratio vs capacity"
    return _save(plt, fig, ax, "capacity (blocks)", title, path)


def _plot_time(plt: Any, swept: Sweep, capacity: int, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy, by_capacity in swept.results.items():
        points = by_capacity[capacity].ratio_over_time()
        ax.plot([t / 60 for t, _ in points], [r for _, r in points], label=policy)
    if capacity in swept.bounds:
        points = swept.bounds[capacity].ratio_over_time()
        ax.plot([t / 60 for t, _ in points], [r for _, r in points], "k--", label="MIN")
    title = f"{swept.trace_name}: hit ratio over time at {capacity:,} blocks"
    return _save(plt, fig, ax, "minutes into the trace", title, path)


def _save(plt: Any, fig: Any, ax: Any, xlabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("block hit ratio")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
