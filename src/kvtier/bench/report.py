"""How ``kvtier bench ...`` commands print their figures: one table, then JSON."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

__all__ = ["print_figures"]

Row = tuple[str, str, str]


def print_figures(title: str, rows: Iterable[Row]) -> None:
    """Prints ``(figure, value, target)`` rows as a table on stdout."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
