"""``kvtier serve`` and the operator commands that talk to a node.

    kvtier serve [--host H] [--port P] [--http-port P] [--grpc-port P] [--token T]
    kvtier put   --server ADDR KEY FILE      store FILE's bytes as one block
    kvtier get   --server ADDR KEY [-o FILE] fetch one block (stdout by default)
    kvtier ls    --server ADDR [--group G] [--limit N]
    kvtier rm    --server ADDR KEY...
    kvtier stats --server ADDR

KEY is a block key as 32 hex digits, or any other string, which names a block the way
the gRPC API's ``name`` does (its key is derived from the name).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtier.config import Config
from kvtier.core.keys import BlockKey
from kvtier.results import jsonable

__all__ = ["register"]

Loader = Callable[[argparse.Namespace], Config]


def register(sub: Any, common: argparse.ArgumentParser, load: Loader) -> None:
    """Adds the node's commands to the ``kvtier`` parser."""
    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run a kvtier node (the default: memory + "
        "disk under ./kvtier-data, TCP 7480, HTTP 7481, gRPC 7482)",
    )
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="TCP protocol port (server.port)")
    serve.add_argument("--http-port", type=int, help="HTTP admin port, 0 = off")
    serve.add_argument("--grpc-port", type=int, help="gRPC port, 0 = off")
    serve.add_argument("--token", help="shared auth token (server.auth_token)")
    serve.add_argument("--memory", help="memory tier size, e.g. 16GiB")
    serve.add_argument("--data-dir", help="where the disk tier lives (store.data_dir)")
    serve.add_argument("--cluster", help="join this cluster (cluster.name)")
    serve.add_argument("--etcd", help="etcd endpoints host:port,... (cluster.etcd)")
    serve.add_argument("--zone", help="failure domain of this node (cluster.zone)")
    serve.add_argument("--advertise", help="host:port clients use (cluster.advertise)")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per log line (for log shippers)",
    )
    serve.set_defaults(run=lambda args: _serve(args, load))

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--server", default="127.0.0.1:7480", help="node host:port")
    client.add_argument("--token", help="the node's auth token")
    client.add_argument("--tcp", action="store_true", help="never use shared memory")
    put = sub.add_parser("put", parents=[client], help="store a file as one block")
    put.add_argument("key")
    put.add_argument("file", type=Path)
    put.set_defaults(run=_put)
    get = sub.add_parser("get", parents=[client], help="fetch one block")
    get.add_argument("key")
    get.add_argument("-o", "--output", type=Path, help="file to write (default stdout)")
    get.set_defaults(run=_get)
    ls = sub.add_parser("ls", parents=[client], help="list stored blocks")
    ls.add_argument("--group", help="only this quota group")
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(run=_ls)
    rm = sub.add_parser("rm", parents=[client], help="delete blocks")
    rm.add_argument("keys", nargs="+")
    rm.set_defaults(run=_rm)
    stats = sub.add_parser("stats", parents=[client], help="a node's status as JSON")
    stats.set_defaults(run=_stats)


def _serve(args: argparse.Namespace, load: Loader) -> int:
    from kvtier.server.node import run_node

    flags = {
        "server.host": args.host,
        "server.port": args.port,
        "server.http_port": args.http_port,
        "server.grpc_port": args.grpc_port,
        "server.auth_token": args.token,
        "memory.capacity_bytes": args.memory,
        "store.data_dir": args.data_dir,
        "cluster.name": args.cluster,
        "cluster.etcd": args.etcd,
        "cluster.zone": args.zone,
        "cluster.advertise": args.advertise,
    }
    args.set += [f"{k}={v}" for k, v in flags.items() if v is not None]
    config = load(args)
    _configure_logging(args.log_format, args.verbose)
    asyncio.run(run_node(config))
    return 0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def parse_key(text: str) -> BlockKey:
    """A key from 32 hex digits, or the key of a block named ``text``."""
    from kvtier.server.grpc_service import name_key

    if len(text) == 32:
        try:
            return BlockKey(bytes.fromhex(text))
        except ValueError:
            pass
    return name_key(text)


def _client(args: argparse.Namespace) -> Any:
    from kvtier.client import Client

    return Client(
        args.server, token=args.token, shared_memory=False if args.tcp else None
    )


def _put(args: argparse.Namespace) -> int:
    data = args.file.read_bytes()
    with _client(args) as client:
        started = time.perf_counter()
        stored = client.put([parse_key(args.key)], [data])
        seconds = time.perf_counter() - started
    print(json.dumps({"stored": bool(stored), "bytes": len(data), "seconds": seconds}))
    return 0 if stored else 1


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        blocks = client.get([parse_key(args.key)])
    if not blocks:
        print(f"no block {args.key!r} on {args.server}", file=sys.stderr)
        return 1
    if args.output:
        args.output.write_bytes(blocks[0].tobytes())
    else:
        sys.stdout.buffer.write(blocks[0].tobytes())
    return 0


def _ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = client.list(args.group, args.limit)
    for info in infos:
        print(json.dumps(jsonable(info)))
    return 0


def _rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        removed = client.delete([parse_key(k) for k in args.keys])
    print(json.dumps({"removed": removed}))
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.stats(), indent=2))
    return 0
