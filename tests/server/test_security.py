"""With a token set, every interface refuses every request that lacks it or is wrong:
the TCP protocol (every operation), the same-host Unix socket, HTTP, gRPC; and TLS
carries all three end to end."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kvnode import NodeProcess, start_node
from kvwire import closed_by_peer, hello, read_frame
from test_tls_and_cli import self_signed

from kvtier import protocol as proto
from kvtier.errors import AuthenticationError
from kvtier.protocol import Kind, Op
from kvtier.server._grpc import kvcache_pb2 as pb
from kvtier.server._grpc import kvcache_pb2_grpc as pb_grpc

TOKEN = "operators-secret"
WRONG = ["", "operators-secre", "operators-secret ", "OPERATORS-SECRET", "x" * 10000]


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(tmp_path_factory.mktemp("locked"), token=TOKEN)
    yield node
    node.stop()


def unix_name(node: NodeProcess) -> str:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        kind, body = hello(sock, TOKEN)
    assert kind == Kind.REPLY and body["unix"]
    return str(body["unix"])


def connect(node: NodeProcess, unix: str | None) -> socket.socket:
    if unix is None:
        return socket.create_connection(("127.0.0.1", node.port), timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect("\0" + unix)
    return sock


@pytest.mark.parametrize("path", ["tcp", "unix"])
@pytest.mark.parametrize("op", [op for op in Op if op != Op.HELLO])
def test_every_operation_before_hello_is_refused_and_closes(
    locked: NodeProcess, path: str, op: Op
) -> None:
    unix = unix_name(locked) if path == "unix" else None
    with connect(locked, unix) as sock:
        body = {"keys": [bytes(16)], "sizes": [4], "id": 1}
        payload = b"abcd" if op == Op.PUT else b""
        sock.sendall(
            proto.encode_frame(Kind.REQUEST, op, 7, body, len(payload)) + payload
        )
        kind, reply = read_frame(sock)
        assert kind == Kind.ERROR and reply["code"] == "unauthorized"
        assert closed_by_peer(sock)


@pytest.mark.parametrize("path", ["tcp", "unix"])
def test_every_wrong_token_is_refused_and_closes(
    locked: NodeProcess, path: str
) -> None:
    unix = unix_name(locked) if path == "unix" else None
    for token in WRONG:
        with connect(locked, unix) as sock:
            kind, reply = hello(sock, token)
            assert (kind, reply["code"]) == (Kind.ERROR, "unauthorized"), token[:20]
            assert closed_by_peer(sock)
    with connect(locked, unix) as sock:  # the right one, on the same path
        assert hello(sock, TOKEN)[0] == Kind.REPLY
    for token in (None, "nope"):
        with pytest.raises(AuthenticationError):
            locked.client(token=token, retries=0)


def test_the_arena_is_never_handed_out_before_hello(locked: NodeProcess) -> None:
    with connect(locked, unix_name(locked)) as sock:
        sock.sendall(proto.encode_frame(Kind.REQUEST, Op.ARENA, 1, {}))
        data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
        assert fds == []
        assert data[3] == Kind.ERROR


HTTP_ROUTES = [
    ("GET", "/metrics"),
    ("GET", "/v1/status"),
    ("POST", "/v1/match"),
    ("POST", "/v1/contains"),
    ("GET", "/v1/keys"),
    ("GET", "/v1/cluster"),
]


def http_status(
    base: str,
    method: str,
    path: str,
    token: str | None,
    scheme: str = "Bearer",
    **kwargs: Any,
) -> int:
    data = json.dumps({"keys": []}).encode() if method == "POST" else None
    request = urllib.request.Request(base + path, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"{scheme} {token}".strip())
    try:
        with urllib.request.urlopen(request, timeout=10, **kwargs) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


@pytest.mark.parametrize(("method", "path"), HTTP_ROUTES)
def test_every_http_route_refuses_a_missing_or_wrong_token(
    locked: NodeProcess, method: str, path: str
) -> None:
    # (HTTP trims a header's surrounding spaces, so WRONG's " " variant is no test.)
    for token in [None, "", "operators-secre", "OPERATORS-SECRET", "x" * 1000]:
        assert http_status(locked.http, method, path, token) == 401, token
    # The right secret in another scheme, or bare, is no bearer token either.
    for scheme in ("Basic", "Token", ""):
        assert http_status(locked.http, method, path, TOKEN, scheme) == 401, scheme
    assert http_status(locked.http, method, path, TOKEN) in (200, 404)


def test_probes_stay_open_for_orchestrators(locked: NodeProcess) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert http_status(locked.http, "GET", path, None) == 200


GRPC_CALLS = [
    ("StoreKVCache", pb.StoreKVCacheRequest(blocks=[pb.Block(name="x", data=b"y")])),
    ("RetrieveKVCache", pb.RetrieveKVCacheRequest(names=["x"])),
    ("DeleteKVCache", pb.DeleteKVCacheRequest(names=["x"])),
    ("ListKVCacheKeys", pb.ListKVCacheKeysRequest()),
    ("MatchPrefix", pb.MatchPrefixRequest(keys=[bytes(16)])),
]


@pytest.mark.parametrize(("method", "request_"), GRPC_CALLS)
def test_every_grpc_method_refuses_a_missing_or_wrong_token(
    locked: NodeProcess, method: str, request_: Any
) -> None:
    with grpc.insecure_channel(locked.grpc) as channel:
        call = getattr(pb_grpc.KVCacheServiceStub(channel), method)
        for metadata in ([], [("authorization", "Bearer nope")], [("x", TOKEN)]):
            with pytest.raises(grpc.RpcError) as err:
                call(request_, metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call(request_, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)


def test_tls_carries_http_and_grpc_end_to_end(
    node_factory: Any, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    node = node_factory(
        f"server.tls_cert={cert}", f"server.tls_key={key}", token=TOKEN, tls_ca=cert
    )
    https = f"https://127.0.0.1:{node.http_port}"
    trusting = ssl.create_default_context(cafile=str(cert))
    assert http_status(https, "GET", "/v1/status", TOKEN, context=trusting) == 200
    assert http_status(https, "GET", "/v1/status", None, context=trusting) == 401
    with pytest.raises(urllib.error.URLError):  # a client that does not trust it
        http_status(
            https, "GET", "/healthz", None, context=ssl.create_default_context()
        )
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP
        http_status(node.http, "GET", "/healthz", None)
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(node.grpc, credentials) as channel:
        stub = pb_grpc.KVCacheServiceStub(channel)
        auth = [("authorization", f"Bearer {TOKEN}")]
        request = pb.StoreKVCacheRequest(blocks=[pb.Block(name="t", data=b"tls")])
        assert list(stub.StoreKVCache(request, metadata=auth, timeout=10).stored) == [
            True
        ]
        got = stub.RetrieveKVCache(
            pb.RetrieveKVCacheRequest(names=["t"]), metadata=auth, timeout=10
        )
        assert [b.data for b in got.blocks] == [b"tls"]
    with grpc.insecure_channel(node.grpc) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.KVCacheServiceStub(channel).MatchPrefix(
            pb.MatchPrefixRequest(keys=[bytes(16)]), metadata=auth, timeout=5
        )
