"""Real etcd clusters for tests: the Debian etcd-server binary on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvtier.bench.timing import free_port


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def status(self) -> dict[str, object] | None:
        request = urllib.request.Request(
            f"http://{self.endpoint}/v3/maintenance/status", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return json.loads(response.read())  # type: ignore[no-any-return]
        except OSError:
            return None


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    token: str
    logs: list[object] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, member: EtcdMember, state: str = "new") -> None:
        initial = ",".join(
            f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members
        )
        log = open(member.data_dir.with_suffix(".log"), "ab")  # noqa: SIM115
        self.logs.append(log)
        member.proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                member.name,
                "--data-dir",
                str(member.data_dir),
                "--listen-client-urls",
                f"http://127.0.0.1:{member.client_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{member.client_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{member.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{member.peer_port}",
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                self.token,
                "--log-level",
                "error",
                "--logger",
                "zap",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "250",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def leader(self) -> EtcdMember | None:
        for member in self.members:
            if member.proc is None or member.proc.poll() is not None:
                continue
            status = member.status()
            if status and status.get("leader") == status.get("header", {}).get(
                "member_id"
            ):
                return member
        return None

    def wait_ready(self, timeout: float = 10.0) -> EtcdMember:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            time.sleep(0.02)
        pytest.fail(f"etcd had no leader after {timeout} s")

    def kill(self, member: EtcdMember) -> None:
        assert member.proc is not None
        member.proc.send_signal(signal.SIGKILL)
        member.proc.wait(timeout=10)

    def stop(self) -> None:
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                member.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    member.proc.wait(timeout=10)
                if member.proc.poll() is None:
                    member.proc.kill()
                    member.proc.wait()
        for log in self.logs:
            log.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def etcd_cluster(base: Path, size: int = 3) -> Iterator[EtcdCluster]:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed (apt-get install etcd-server)")
    base.mkdir(parents=True, exist_ok=True)
    members = [
        EtcdMember(f"m{i}", free_port(), free_port(), base / f"etcd-m{i}")
        for i in range(size)
    ]
    cluster = EtcdCluster(members, f"kvtier-{uuid.uuid4().hex[:8]}")
    try:
        for member in members:
            cluster.start(member)
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
