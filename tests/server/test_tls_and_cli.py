"""TLS end to end, and the operator commands (kvtier put/get/ls/rm/stats)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvnode import NodeProcess

from kvtier import Namespace, block_keys


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvtier-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_end_to_end(node_factory: Any, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    node = node_factory(
        f"server.tls_cert={cert}",
        f"server.tls_key={key}",
        token="tls-token",
        tls_ca=cert,
    )
    context = ssl.create_default_context(cafile=str(cert))
    keys = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(3)))
    data = [np.full(300_000, i, np.uint8) for i in range(3)]
    with node.client(shared_memory=False, tls=context) as client:
        assert client.put(keys, data)
        got = client.get(keys)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))
    from kvtier.errors import ConnectionLostError

    untrusting = ssl.create_default_context()  # does not trust the self-signed cert
    with pytest.raises(ConnectionLostError):
        node.client(shared_memory=False, tls=untrusting, retries=0)


def kvtier(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_operator_commands(node: NodeProcess, tmp_path: Path) -> None:
    payload = tmp_path / "block.bin"
    payload.write_bytes(np.arange(5000, dtype=np.uint16).tobytes())
    name = f"ops/{uuid.uuid4().hex}"
    server = ["--server", node.address]
    out = kvtier("put", *server, name, str(payload))
    assert out.returncode == 0 and json.loads(out.stdout)["stored"] is True
    fetched = tmp_path / "back.bin"
    assert kvtier("get", *server, name, "-o", str(fetched)).returncode == 0
    assert fetched.read_bytes() == payload.read_bytes()
    listed = kvtier("ls", *server, "--limit", "100000")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) >= 1
    stats = json.loads(kvtier("stats", *server).stdout)
    assert stats["ready"] is True
    assert json.loads(kvtier("rm", *server, name).stdout) == {"removed": 1}
    missing = kvtier("get", *server, name)
    assert missing.returncode == 1 and "no block" in missing.stderr


def test_serve_help_documents_every_flag() -> None:
    out = kvtier("serve", "--help")
    assert out.returncode == 0
    for flag in (
        "--host",
        "--port",
        "--http-port",
        "--grpc-port",
        "--token",
        "--memory",
        "--data-dir",
        "--log-format",
        "--config",
        "--set",
    ):
        assert flag in out.stdout


def test_a_node_that_cannot_listen_says_why(node: NodeProcess, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtier.cli",
            "serve",
            "--port",
            str(node.port),
            "--data-dir",
            str(tmp_path),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and f"server.port {node.port}" in out.stderr
