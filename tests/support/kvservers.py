"""Real Redis (single, Cluster, Sentinel) and S3-compatible (moto) servers for tests,
on 127.0.0.1 with free ports and temporary directories."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvtier.bench.timing import free_port


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _redis_args(port: int, directory: Path) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
        "--logfile",
        str(directory / "redis.log"),
    ]


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@contextlib.contextmanager
def redis_server(base: Path) -> Iterator[int]:
    import redis

    port = free_port()
    directory = base / f"redis-{port}"
    directory.mkdir()
    with processes() as procs:
        procs.append(subprocess.Popen(_redis_args(port, directory)))
        wait_for(lambda: redis.Redis(port=port).ping(), 10, "redis-server")
        yield port


@contextlib.contextmanager
def redis_cluster(base: Path, masters: int = 3) -> Iterator[list[int]]:
    """A Redis Cluster of ``masters`` masters, slots split evenly, state ok."""
    import redis

    ports = [free_port() for _ in range(masters)]
    bus_ports = [free_port() for _ in range(masters)]
    with processes() as procs:
        for port, bus in zip(ports, bus_ports, strict=True):
            directory = base / f"rc-{port}"
            directory.mkdir()
            procs.append(
                subprocess.Popen(
                    _redis_args(port, directory)
                    + [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(directory / "nodes.conf"),
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-port",
                        str(bus),
                    ]
                )
            )
        clients = [redis.Redis(port=port) for port in ports]
        for client in clients:
            wait_for(client.ping, 10, "a cluster member")
        step = 16384 // masters
        for i, client in enumerate(clients):
            high = 16383 if i == masters - 1 else (i + 1) * step - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, high)
        for port, bus in zip(ports[1:], bus_ports[1:], strict=True):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        for client in clients:
            wait_for(
                lambda c=client: c.cluster("info")["cluster_state"] == "ok",
                20,
                "cluster_state ok",
            )
        yield ports
        for client in clients:
            client.close()


@contextlib.contextmanager
def redis_sentinel(base: Path) -> Iterator[tuple[int, int]]:
    """A master and one Sentinel watching it as ``mymaster``: (master, sentinel)."""
    import redis

    master = free_port()
    sentinel = free_port()
    with redis_server(base) as master_port, processes() as procs:
        master = master_port
        conf = base / f"sentinel-{sentinel}.conf"
        conf.write_text(
            f"port {sentinel}\nbind 127.0.0.1\nprotected-mode no\n"
            f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
            f"dir {base}\n"
        )
        binary = shutil.which("redis-server")
        assert binary is not None
        procs.append(
            subprocess.Popen(
                [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL
            )
        )
        wait_for(lambda: redis.Redis(port=sentinel).ping(), 10, "redis sentinel")
        yield master, sentinel


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """An S3-compatible server (moto, in memory) and its process, to kill mid-run."""
    port = free_port()
    binary = shutil.which("moto_server")
    command = [binary] if binary else [sys.executable, "-m", "moto.server"]
    with processes() as procs:
        procs.append(
            subprocess.Popen(
                [*command, "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for(
            lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True,
            30,
            "moto_server",
        )
        yield port, procs[0]
