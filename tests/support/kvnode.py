"""Real kvtier nodes for tests: subprocesses on 127.0.0.1 with free ports."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from kvtier.chaos.node import NodeProcess as ChaosNode
from kvtier.chaos.node import NodeSpec
from kvtier.client import Client


@dataclass
class NodeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    http_port: int
    grpc_port: int
    data_dir: Path
    token: str | None
    log: IO[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def client(self, **options: Any) -> Client:
        options.setdefault("token", self.token)
        return Client(self.address, **options)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.log.close()

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def start_node(
    data_dir: Path,
    *settings: str,
    token: str | None = None,
    env: dict[str, str] | None = None,
    tls_ca: Path | None = None,
    memory: str = "256MiB",
) -> NodeProcess:
    spec = NodeSpec(
        data_dir,
        memory=memory,
        settings=("disk.capacity_bytes=1GiB", *settings),
        token=token,
        http=True,
        grpc=True,
    )
    runner = ChaosNode(spec)  # only its ports and command line
    port, http_port, grpc_port = runner.port, runner.http_port, runner.grpc_port
    args = runner.args()
    log = open(data_dir.parent / f"node-{port}.log", "wb")  # noqa: SIM115 - the node owns it
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    node = NodeProcess(proc, port, http_port, grpc_port, data_dir, token, log)

    def answers() -> bool:
        if proc.poll() is not None:
            log.close()
            pytest.fail(
                f"the node exited with {proc.returncode}: {node.log_text()[-2000:]}"
            )
        try:
            tls = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
            with node.client(
                shared_memory=False, timeout=2, retries=0, tls=tls
            ) as client:
                # ready, not only answering: a cluster node serves before it joins
                return bool(client.stats()["ready"])
        except Exception:
            return False

    wait_until(answers, 30, "the node to be ready")
    return node
