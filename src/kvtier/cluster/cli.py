"""``kvtier cluster``: look at and configure a cluster through etcd.

    kvtier cluster status --etcd H:P,... --cluster NAME [--json]
    kvtier cluster set    --etcd H:P,... --cluster NAME replicas=2 write_quorum=1
    kvtier cluster quota  --etcd H:P,... --cluster NAME GROUP [--memory 4GiB]
                          [--disk 50GiB]

``status`` lists the live nodes (address, zone, capacity) with each node's usage and
health, read from its HTTP ``/v1/status``; a node that does not answer is listed as
unhealthy. ``set`` changes the cluster's settings (clients and nodes follow within a
moment); ``quota`` sets a quota group's per-node limits (nodes apply it at once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.request
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kvtier.config import parse_bytes
from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.cluster.membership import Membership, NodeInfo

__all__ = ["register"]


def register(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="a cluster's nodes, settings and quotas")
    actions = cluster.add_subparsers(title="actions", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--etcd", required=True, help="etcd endpoints host:port,...")
    common.add_argument("--cluster", required=True, help="the cluster's name")
    status = actions.add_parser("status", parents=[common], help="nodes and usage")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(run=_status)
    settings = actions.add_parser("set", parents=[common], help="cluster settings")
    settings.add_argument(
        "pairs", nargs="+", metavar="KEY=VALUE", help="replicas=R, write_quorum=W"
    )
    settings.set_defaults(run=_set)
    quota = actions.add_parser("quota", parents=[common], help="a group's quota")
    quota.add_argument("group")
    quota.add_argument("--memory", help="per-node memory limit, e.g. 4GiB")
    quota.add_argument("--disk", help="per-node disk limit, e.g. 50GiB")
    quota.set_defaults(run=_quota)


async def _membership(args: argparse.Namespace) -> Membership:
    # aiohttp (the `cluster` extra) loads when a cluster command runs, not for --help
    from kvtier.cluster.etcd import Etcd
    from kvtier.cluster.membership import Membership

    etcd = Etcd(args.etcd.split(","))
    await etcd.connect()
    membership = Membership(etcd, args.cluster)
    await membership.load()
    return membership


def _node_status(info: NodeInfo) -> dict[str, Any] | None:
    if not info.http:
        return None
    try:
        with urllib.request.urlopen(f"http://{info.http}/v1/status", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def _status(args: argparse.Namespace) -> int:
    async def read() -> Membership:
        membership = await _membership(args)
        await membership.etcd.close()
        return membership

    membership = asyncio.run(read())
    rows = []
    for info in sorted(membership.nodes.values(), key=lambda i: i.node_id):
        status = _node_status(info)
        rows.append(
            {
                "node": vars(info),
                "healthy": status is not None,
                "stats": status["stats"] if status else None,
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "cluster": args.cluster,
                    "settings": vars(membership.settings),
                    "quotas": membership.quotas,
                    "nodes": rows,
                }
            )
        )
        return 0
    _print_table(args.cluster, membership, rows)
    return 0 if rows and all(r["healthy"] for r in rows) else 1


def _print_table(name: str, membership: Membership, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    settings = membership.settings
    table = Table(
        title=f"cluster {name}: {len(rows)} nodes, replicas "
        f"{settings.replicas}, write quorum {settings.write_quorum}"
    )
    for column in (
        "node",
        "address",
        "zone",
        "capacity",
        "memory used",
        "disk used",
        "blocks",
        "hit ratio",
        "health",
    ):
        table.add_column(column)
    for row in rows:
        node, stats = row["node"], row["stats"] or {}
        tiers = stats.get("tiers", {})
        table.add_row(
            node["node_id"],
            node["address"],
            node["zone"] or "-",
            _gib(node["capacity_bytes"]),
            _gib(tiers.get("memory", {}).get("used_bytes")),
            _gib(tiers.get("disk", {}).get("used_bytes")),
            str(tiers.get("memory", {}).get("num_blocks", "-")),
            f"{_hit_ratio(stats):.1%}" if stats else "-",
            "ok" if row["healthy"] else "[red]no answer[/]",
        )
    Console().print(table)


def _hit_ratio(stats: dict[str, Any]) -> float:
    total = stats.get("hit_blocks", 0) + stats.get("miss_blocks", 0)
    return stats.get("hit_blocks", 0) / total if total else 0.0


def _gib(nbytes: Any) -> str:
    return "-" if nbytes is None else f"{nbytes / (1 << 30):.2f} GiB"


def _set(args: argparse.Namespace) -> int:
    changes: dict[str, int] = {}
    for pair in args.pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in ("replicas", "write_quorum") or not value.isdigit():
            raise ConfigError(
                f"settings are replicas=R or write_quorum=W, got {pair!r}"
            )
        changes[key] = int(value)

    async def write() -> dict[str, Any]:
        membership = await _membership(args)
        settings = replace(membership.settings, **changes)
        await membership.set_settings(settings)
        await membership.etcd.close()
        return vars(settings)

    print(json.dumps(asyncio.run(write())))
    return 0


def _quota(args: argparse.Namespace) -> int:
    quota = {
        "memory_bytes": parse_bytes(args.memory, "--memory") if args.memory else None,
        "disk_bytes": parse_bytes(args.disk, "--disk") if args.disk else None,
    }

    async def write() -> None:
        membership = await _membership(args)
        await membership.set_quota(args.group, quota)
        await membership.etcd.close()

    asyncio.run(write())
    print(json.dumps({"group": args.group, **quota}))
    return 0
