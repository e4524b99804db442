"""``kvtier bench server``: a node against memcpy, raw sockets, Redis and gRPC.

It starts its own node (a subprocess on loopback) and, for the comparison, a raw socket
peer and a ``redis-server`` when one is installed. Every ratio is baseline time over
kvtier time for the same bytes in the same run (higher is better), each time the
median of ``repeats`` alternating runs:

* same-host put / get through shared memory vs ``numpy.copyto`` (2 MiB and 16 MiB);
* TCP put / get vs a raw socket ``sendall`` / ``recv_into`` to another process;
* TCP put / get vs redis-py SET / GET (pipelined) against redis-server;
* TCP put / get vs the node's own gRPC API carrying the same bytes;
* match / contains latency p50 / p99 with 1, 16 and 64 concurrent clients;
* start-up: a node with a 16 GiB memory tier, from exec to its first answer.

The node under test keeps blocks in memory only (``disk.enabled=false``): the figures
are of the transfer paths, not of the disk tier (``kvtier bench store`` measures that),
and a write-behind flush competing for the same two cores would blur them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.timing import free_port, paired
from kvtier.client import AsyncClient, Client
from kvtier.core.keys import BlockKey, Namespace, block_keys

__all__ = ["ServerBenchConfig", "register", "run_server_bench"]

MiB = 1 << 20


@dataclass(frozen=True)
class ServerBenchConfig:
    block_sizes: tuple[int, ...] = (2 * MiB, 16 * MiB)
    batch_bytes: int = 64 * MiB
    repeats: int = 7
    # A same-host pair takes ~12 ms, so it can afford the repeats a steady median
    # needs on a shared machine (one run's medians moved by +-0.05 with 7).
    shm_repeats: int = 31
    latency_calls: int = 400
    concurrency: tuple[int, ...] = (1, 16, 64)
    startup_memory: str = "16GiB"

    @classmethod
    def quick(cls) -> ServerBenchConfig:
        return cls(batch_bytes=32 * MiB, repeats=3, shm_repeats=7, latency_calls=100)


def register(bench_sub: Any) -> None:
    parser = bench_sub.add_parser(
        "server", help="a node vs memcpy, raw sockets, Redis and gRPC"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~30 s)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.set_defaults(run=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    cfg = ServerBenchConfig.quick() if args.quick else ServerBenchConfig()
    console = Console(stderr=True)
    with console.status("starting") as status:
        results = run_server_bench(cfg, lambda text: status.update(text))
    table = Table(title="kvtier bench server (medians)")
    for column in ("figure", "value", "target"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for key, value in results.items():
        table.add_row(key, _show(key, value), _TARGETS.get(key.split("@")[0], ""))
    Console().print(table)
    if args.json:
        print(json.dumps(results))
    return 0


def _show(key: str, value: float) -> str:
    if key.endswith("_bytes_per_s"):
        return f"{value / (1 << 30):.2f} GiB/s"
    return f"{value:.3f}"


_TARGETS = {
    "shm_put_ratio": ">= 0.8",
    "shm_get_ratio": ">= 0.8",
    "tcp_put_ratio": ">= 0.8",
    "tcp_get_ratio": ">= 0.8",
    "redis_put_ratio": ">= 3",
    "redis_get_ratio": ">= 2",
    "grpc_put_ratio": ">= 2",
    "grpc_get_ratio": ">= 2",
    "startup_16gib_s": "<= 1",
}


def run_server_bench(
    cfg: ServerBenchConfig, progress: Callable[[str], None]
) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as scratch:
        progress("start-up of a 16 GiB node")
        results["startup_16gib_s"] = _startup(Path(scratch) / "startup", cfg)
        with _node(Path(scratch) / "node") as address:
            batches = {
                size: [
                    np.random.default_rng(i).integers(0, 256, size, np.uint8)
                    for i in range(max(1, cfg.batch_bytes // size))
                ]
                for size in cfg.block_sizes
            }
            # The memcpy-bound pairs first: the gRPC and Redis sections free big
            # buffers, after which glibc raises its mmap threshold and serves later
            # arrays from heap mapped in 4 KiB pages rather than fresh huge pages,
            # which moved the same-host figures by up to 0.1.
            for size, blocks in batches.items():
                label = f"{size // MiB}MiB"
                progress(f"shared memory, {label} blocks")
                results.update(_suffix(_bench_shm(address, blocks, cfg), label))
            for size, blocks in batches.items():
                label = f"{size // MiB}MiB"
                progress(f"TCP vs raw sockets, {label} blocks")
                results.update(_suffix(_bench_tcp(address, blocks, cfg), label))
                progress(f"TCP vs gRPC, {label} blocks")
                results.update(_suffix(_bench_grpc(address, blocks, cfg), label))
                progress(f"TCP vs Redis, {label} blocks")
                results.update(
                    _suffix(_bench_redis(address, blocks, cfg, scratch), label)
                )
            progress("match / contains latency")
            results.update(_bench_latency(address, cfg))
    return results


def _suffix(figures: dict[str, float], label: str) -> dict[str, float]:
    return {f"{key}@{label}": value for key, value in figures.items()}


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class NodeAddress:
    tcp: str
    grpc: str


@contextlib.contextmanager
def _node(data_dir: Path, memory: str = "4GiB") -> Iterator[NodeAddress]:
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvtier.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--memory",
            memory,
            "--port",
            str(port),
            "--http-port",
            "0",
            "--grpc-port",
            str(grpc_port),
            "--set",
            "disk.enabled=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(f"127.0.0.1:{port}", proc, timeout=60)
        yield NodeAddress(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _wait_ready(address: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until the node answers a ping over TCP."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode}")
        try:
            with Client(address, shared_memory=False, timeout=2, retries=0) as client:
                client.ping()
            return time.perf_counter() - started
        except Exception:  # not listening yet
            time.sleep(0.005)
    raise RuntimeError(f"the node at {address} did not answer in {timeout} s")


def _startup(data_dir: Path, cfg: ServerBenchConfig) -> float:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvtier.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--memory",
            cfg.startup_memory,
            "--port",
            str(port),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(f"127.0.0.1:{port}", proc, timeout=60)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ---------------------------------------------------------------- measurements


def _keys(count: int, salt: str) -> list[BlockKey]:
    return list(block_keys(Namespace(f"bench-{salt}", block_tokens=1), range(count)))


def _bench_shm(
    address: NodeAddress, blocks: list[Any], cfg: ServerBenchConfig
) -> dict[str, float]:
    size = blocks[0].nbytes
    keys = _keys(len(blocks), f"shm{size}")
    dst = np.ones(len(blocks) * size, np.uint8)
    outs = [np.ones(size, np.uint8) for _ in blocks]
    with Client(address.tcp, shared_memory=True) as client:
        client.put(keys, blocks)  # fault the slots in once, like dst above

        def copy_in() -> None:
            for i, block in enumerate(blocks):
                np.copyto(dst[i * size : (i + 1) * size], block)

        def copy_out() -> None:
            for i, out in enumerate(outs):
                np.copyto(out, dst[i * size : (i + 1) * size])

        copy_in()
        put_base, put_s = paired(
            copy_in,
            lambda: _must(client.put(keys, blocks)),
            cfg.shm_repeats,
            subject_setup=lambda: _clear(client, keys),
        )
        get_base, get_s = paired(
            copy_out,
            lambda: _must(client.get_into(keys, outs) == len(keys)),
            cfg.shm_repeats,
        )
        client.delete(keys)
    total = len(blocks) * size
    return {
        "shm_put_ratio": put_base / put_s,
        "shm_get_ratio": get_base / get_s,
        "shm_put_bytes_per_s": total / put_s,
        "shm_get_bytes_per_s": total / get_s,
    }


def _clear(client: Client, keys: list[BlockKey]) -> None:
    client.delete(keys)


def _must(ok: Any) -> None:
    if not ok:
        raise RuntimeError("a benchmark request failed")


_RAW_PEER = r"""
import socket, sys
mode, total = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = memoryview(bytearray(total))
while True:
    if not conn.recv_into(buf[:1], 1):
        break
    if mode == "sink":  # receive `total` bytes, then acknowledge
        got = 0
        while got < total:
            got += conn.recv_into(buf[got:])
        conn.sendall(b"k")
    else:  # send `total` bytes
        conn.sendall(buf)
"""


@contextlib.contextmanager
def _raw_peer(mode: str, total: int) -> Iterator[socket.socket]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _RAW_PEER, mode, str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            yield sock
        finally:
            sock.close()
    finally:
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def _bench_tcp(
    address: NodeAddress, blocks: list[Any], cfg: ServerBenchConfig
) -> dict[str, float]:
    size, total = blocks[0].nbytes, len(blocks) * blocks[0].nbytes
    keys = _keys(len(blocks), f"tcp{size}")
    outs = [np.ones(size, np.uint8) for _ in blocks]
    ack = bytearray(1)
    with (
        Client(address.tcp, shared_memory=False, pool_size=1) as client,
        _raw_peer("sink", total) as sink,
        _raw_peer("source", total) as source,
    ):

        def raw_put() -> None:
            sink.sendall(b"p")
            for block in blocks:
                sink.sendall(block.data)
            sink.recv_into(ack, 1)

        def raw_get() -> None:
            source.sendall(b"g")
            for out in outs:
                view = out.data
                while view:
                    view = view[source.recv_into(view) :]

        put_base, put_s = paired(
            raw_put,
            lambda: _must(client.put(keys, blocks)),
            cfg.repeats,
            subject_setup=lambda: _clear(client, keys),
        )
        get_base, get_s = paired(
            raw_get,
            lambda: _must(client.get_into(keys, outs) == len(keys)),
            cfg.repeats,
        )
        client.delete(keys)
    return {
        "tcp_put_ratio": put_base / put_s,
        "tcp_get_ratio": get_base / get_s,
        "tcp_put_bytes_per_s": total / put_s,
        "tcp_get_bytes_per_s": total / get_s,
        "raw_socket_bytes_per_s": total / put_base,
    }


def _bench_grpc(
    address: NodeAddress, blocks: list[Any], cfg: ServerBenchConfig
) -> dict[str, float]:
    import grpc

    from kvtier.server._grpc import kvcache_pb2 as pb
    from kvtier.server._grpc import kvcache_pb2_grpc as pb_grpc

    size = blocks[0].nbytes
    keys = _keys(len(blocks), f"grpc{size}")
    outs = [np.ones(size, np.uint8) for _ in blocks]
    options = [
        ("grpc.max_receive_message_length", 1 << 30),
        ("grpc.max_send_message_length", 1 << 30),
    ]
    with (
        grpc.insecure_channel(address.grpc, options=options) as channel,
        Client(address.tcp, shared_memory=False, pool_size=1) as client,
    ):
        stub = pb_grpc.KVCacheServiceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.StoreKVCacheRequest(
            blocks=[
                pb.Block(key=k, data=b.tobytes())
                for k, b in zip(keys, blocks, strict=True)
            ],
            unchained=True,
        )

        def grpc_put() -> None:
            stub.StoreKVCache(request)

        def grpc_get() -> None:
            reply = stub.RetrieveKVCache(pb.RetrieveKVCacheRequest(keys=keys))
            for block, out in zip(reply.blocks, outs, strict=True):
                out[:] = np.frombuffer(block.data, np.uint8)

        def clear() -> None:
            client.delete(keys)

        put_grpc, put_s = paired(
            grpc_put, lambda: _must(client.put(keys, blocks)), cfg.repeats, clear, clear
        )
        get_grpc, get_s = paired(
            grpc_get,
            lambda: _must(client.get_into(keys, outs) == len(keys)),
            cfg.repeats,
        )
        clear()
    return {"grpc_put_ratio": put_grpc / put_s, "grpc_get_ratio": get_grpc / get_s}


@contextlib.contextmanager
def _redis_server(scratch: str) -> Iterator[int | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    directory = tempfile.mkdtemp(dir=scratch)
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            directory,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--proto-max-bulk-len",
            "1gb",
            "--client-query-buffer-limit",
            "2gb",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _bench_redis(
    address: NodeAddress, blocks: list[Any], cfg: ServerBenchConfig, scratch: str
) -> dict[str, float]:
    try:
        import redis
    except ImportError:
        return {}
    with _redis_server(scratch) as port:
        if port is None:
            return {}
        size = blocks[0].nbytes
        keys = _keys(len(blocks), f"redis{size}")
        outs = [np.ones(size, np.uint8) for _ in blocks]
        server = redis.Redis(port=port)
        with Client(address.tcp, shared_memory=False, pool_size=1) as client:

            def redis_put() -> None:
                pipe = server.pipeline(transaction=False)
                for key, block in zip(keys, blocks, strict=True):
                    pipe.set(key, block.data)
                pipe.execute()

            def redis_get() -> None:
                pipe = server.pipeline(transaction=False)
                for key in keys:
                    pipe.get(key)
                for value, out in zip(pipe.execute(), outs, strict=True):
                    out[:] = np.frombuffer(value, np.uint8)

            def clear() -> None:
                client.delete(keys)
                server.flushall()

            # both sides store into a server: each starts from an empty one
            put_redis, put_s = paired(
                redis_put,
                lambda: _must(client.put(keys, blocks)),
                cfg.repeats,
                clear,
                clear,
            )
            redis_put()  # both hold the blocks for the gets
            get_redis, get_s = paired(
                redis_get,
                lambda: _must(client.get_into(keys, outs) == len(keys)),
                cfg.repeats,
            )
            clear()
        server.close()
    return {"redis_put_ratio": put_redis / put_s, "redis_get_ratio": get_redis / get_s}


def _bench_latency(address: NodeAddress, cfg: ServerBenchConfig) -> dict[str, float]:
    return asyncio.run(_latency(address, cfg))


async def _latency(address: NodeAddress, cfg: ServerBenchConfig) -> dict[str, float]:
    keys = _keys(64, "latency")
    figures: dict[str, float] = {}
    async with AsyncClient(address.tcp, shared_memory=False) as seeder:
        await seeder.put(keys, [np.zeros(4096, np.uint8)] * len(keys))
    for clients in cfg.concurrency:
        for op in ("match", "contains"):
            samples = await _concurrent_calls(
                address, keys, op, clients, max(cfg.latency_calls // clients, 10)
            )
            figures[f"{op}_p50_ms@{clients}"] = float(np.percentile(samples, 50)) * 1e3
            figures[f"{op}_p99_ms@{clients}"] = float(np.percentile(samples, 99)) * 1e3
    return figures


async def _concurrent_calls(
    address: NodeAddress, keys: list[BlockKey], op: str, clients: int, calls: int
) -> list[float]:
    pool = [
        AsyncClient(address.tcp, shared_memory=False, pool_size=1)
        for _ in range(clients)
    ]
    await asyncio.gather(*(c.connect() for c in pool))
    samples: list[float] = []

    async def worker(client: AsyncClient) -> None:
        call = client.match if op == "match" else client.contains
        for _ in range(calls):
            start = time.perf_counter()
            await call(keys)
            samples.append(time.perf_counter() - start)

    try:
        await asyncio.gather(*(worker(c) for c in pool))
    finally:
        await asyncio.gather(*(c.close() for c in pool))
    return samples


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_server_bench(ServerBenchConfig.quick(), print)))
    os._exit(0)
