"""A ``kvtier serve`` subprocess on 127.0.0.1 to start, kill and restart.

The node keeps its data directory and ports across restarts, so a harness can SIGKILL
it at any moment and bring the same node back, as an operator's supervisor would.
Readiness is observed, never assumed: :meth:`NodeProcess.start` returns once the node
answers a PING over TCP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kvtier.bench.timing import free_port
from kvtier.client import Client
from kvtier.errors import KVTierError

__all__ = ["NodeProcess", "NodeSpec"]


@dataclass(frozen=True)
class NodeSpec:
    """How to run the node.

    Attributes:
        data_dir: Its ``store.data_dir`` (kept across restarts).
        memory: Size of the memory tier.
        settings: Extra ``section.key=value`` settings.
        token: ``server.auth_token``, if any.
        http: Serve the HTTP admin API too.
        grpc: Serve gRPC too.
    """

    data_dir: Path
    memory: str = "64MiB"
    settings: tuple[str, ...] = ()
    token: str | None = None
    http: bool = False
    grpc: bool = False


@dataclass
class NodeProcess:
    """One node, restartable. Ports are picked once and kept."""

    spec: NodeSpec
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the node is not running"
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.spec.data_dir.with_name(self.spec.data_dir.name + ".log")

    def args(self, *settings: str) -> list[str]:
        spec = self.spec
        args = [
            sys.executable,
            "-m",
            "kvtier.cli",
            "serve",
            "--data-dir",
            str(spec.data_dir),
            "--memory",
            spec.memory,
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port if spec.http else 0),
            "--grpc-port",
            str(self.grpc_port if spec.grpc else 0),
        ]
        for setting in (*spec.settings, *settings):
            args += ["--set", setting]
        if spec.token:
            args += ["--token", spec.token]
        return args

    def start(self, *settings: str, timeout: float = 60.0) -> float:
        """Starts the node (extra ``settings`` for this run); seconds until it answers.

        Raises:
            RuntimeError: It exited or did not answer within ``timeout``.
        """
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.spec.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.args(*settings), stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = started + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the node exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if time.perf_counter() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"the node did not answer within {timeout} s")
            time.sleep(0.01)
        return time.perf_counter() - started

    def _answers(self) -> bool:
        try:
            with self.client(timeout=2, retries=0) as client:
                client.ping()
        except (KVTierError, OSError):
            return False
        return True

    def client(self, **options: Any) -> Client:
        """A TCP client of the node (``shared_memory=True`` for the same-host path)."""
        options.setdefault("token", self.spec.token)
        options.setdefault("shared_memory", False)
        return Client(self.address, **options)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Sends ``sig`` and waits for the exit; its status (None if not running)."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            code = self.proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> None:
        """SIGKILL, now: nothing of the node's shutdown runs."""
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the node process."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def open_fds(self) -> int:
        """File descriptors the node holds open."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_tail(self, nbytes: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-nbytes:]
        except OSError:
            return ""

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGKILL)
