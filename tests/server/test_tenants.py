"""Hostile tenants on one node: tenant tokens confine each tenant to its own blocks.

The worst case is assumed throughout: tenant B names exactly the keys tenant A used
(as if it had learned A's namespace and salt). B still cannot read, match, detect,
delete or overwrite A's blocks, on any interface.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from kvnode import NodeProcess, start_node
from kvwire import hello, read_frame

from kvtier import Namespace, block_keys, load_config
from kvtier import protocol as proto
from kvtier.client import Client
from kvtier.core.keys import KeyChain
from kvtier.errors import AuthenticationError, ConfigError, ConnectionLostError
from kvtier.protocol import Kind, Op
from kvtier.server._grpc import kvcache_pb2 as pb
from kvtier.server._grpc import kvcache_pb2_grpc as pb_grpc

OPS, A, B = "ops-token", "token-of-a", "token-of-b"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(
        tmp_path_factory.mktemp("tenants"),
        f"server.tenant_tokens={{team-a: {A}, team-b: {B}}}",
        "store.quotas={team-a: {memory_bytes: 1MiB}}",
        token=OPS,
    )
    yield node
    node.stop()


def chain(count: int, tenant: str = "team-a") -> KeyChain:
    ns = Namespace(uuid.uuid4().hex, tenant=tenant, block_tokens=1)
    return block_keys(ns, list(range(count)))


def data(count: int, fill: int, nbytes: int = 4096) -> list[np.ndarray[Any, Any]]:
    return [np.full(nbytes, fill + i, np.uint8) for i in range(count)]


def as_tenant(node: NodeProcess, token: str) -> Client:
    return node.client(token=token, shared_memory=False)


def test_another_tenant_cannot_read_match_detect_or_delete(
    shared: NodeProcess,
) -> None:
    keys = chain(6)
    with as_tenant(shared, A) as a, as_tenant(shared, B) as b:
        assert a.put(keys, data(6, 10))
        assert len(a.get(keys)) == 6 and a.match(keys).num_blocks == 6
        assert b.get(keys) == []
        assert b.match(keys).num_blocks == 0
        assert b.match(keys, window=2).num_blocks == 0
        assert b.contains(list(keys)) == [False] * 6
        assert b.prefetch(keys) == 0
        assert b.delete(keys) == 0
        # B's put of the same keys is a fresh put, never "already stored", and
        # leaves A's bytes alone.
        assert b.put(keys, data(6, 100))
        got_a, got_b = a.get(keys), b.get(keys)
        assert all(
            np.array_equal(g, d) for g, d in zip(got_a, data(6, 10), strict=True)
        )
        assert all(
            np.array_equal(g, d) for g, d in zip(got_b, data(6, 100), strict=True)
        )
        assert a.delete(keys) == 6 and len(b.get(keys)) == 6


def test_tenants_get_no_listing_status_or_shared_memory(shared: NodeProcess) -> None:
    with as_tenant(shared, A) as a:
        with pytest.raises(AuthenticationError, match="LIST"):
            a.list()
        with pytest.raises(AuthenticationError, match="STATS"):
            a.stats()
    with shared.client(token=A, shared_memory=None) as a:
        assert not a.shared_memory  # the arena holds everyone's blocks: TCP only
        assert a.node_info["unix"] == ""
    with pytest.raises(ConnectionLostError):
        shared.client(token=A, shared_memory=True)
    with socket.create_connection(("127.0.0.1", shared.port), timeout=10) as sock:
        unix = hello(sock, OPS)[1]["unix"]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect("\0" + unix)
        assert hello(sock, A)[0] == Kind.REPLY
        sock.sendall(proto.encode_frame(Kind.REQUEST, Op.ARENA, 2, {}))
        kind, body = read_frame(sock)
        assert kind == Kind.ERROR and body["code"] == "unauthorized"


def test_a_tenant_counts_against_its_own_quota_whatever_group_it_names(
    shared: NodeProcess,
) -> None:
    big = chain(40, tenant="team-b")  # names B's group: still charged to A
    with as_tenant(shared, A) as a, as_tenant(shared, B) as b:
        small = chain(8, tenant="team-b")
        assert b.put(small, data(8, 1, 64 * 1024))
        for i, block in enumerate(data(40, 1, 64 * 1024)):  # 2.5 MiB, quota 1 MiB
            assert a.put(big[i : i + 1], [block])
        assert len(b.get(small)) == 8  # B kept its blocks in memory
    with shared.client(token=OPS) as ops:
        groups = ops.stats()["stats"]["group_bytes"]["memory"]
        assert groups["team-a"] <= 1 << 20
        assert groups["team-b"] >= 8 * 64 * 1024
        tiers = {tuple(i.tiers) for i in ops.list(group="team-b")}
        assert ("memory",) in tiers or ("memory", "disk") in tiers


def test_operators_list_everyone_but_see_only_scoped_keys(shared: NodeProcess) -> None:
    keys = chain(3)
    with as_tenant(shared, A) as a:
        assert a.put(keys, data(3, 7))
    with shared.client(token=OPS) as ops:
        listed = {info.key for info in ops.list(group="team-a", limit=100_000)}
        assert not listed & set(keys)  # stored under keys only A's token maps to
        assert ops.get(keys) == []


def http(node: NodeProcess, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    data_ = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(node.http + path, data=data_)
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_http_and_grpc_confine_tenants_too(shared: NodeProcess) -> None:
    keys = chain(4)
    with as_tenant(shared, A) as a:
        assert a.put(keys, data(4, 3))
    hexes = {"keys": [k.hex() for k in keys]}
    assert http(shared, "/v1/match", A, hexes) == (
        200,
        {"num_blocks": 4, "tiers": ["memory"] * 4},
    )
    assert http(shared, "/v1/match", B, hexes)[1]["num_blocks"] == 0
    assert http(shared, "/v1/contains", B, hexes)[1] == {"present": [False] * 4}
    for path in ("/v1/keys", "/v1/status", "/metrics", "/v1/cluster"):
        assert http(shared, path, B)[0] == 403, path
    with grpc.insecure_channel(shared.grpc) as channel:
        stub = pb_grpc.KVCacheServiceStub(channel)
        as_a = [("authorization", f"Bearer {A}")]
        as_b = [("authorization", f"Bearer {B}")]
        got = stub.RetrieveKVCache(
            pb.RetrieveKVCacheRequest(keys=list(keys)), metadata=as_b
        )
        assert list(got.blocks) == []
        got = stub.RetrieveKVCache(
            pb.RetrieveKVCacheRequest(keys=list(keys)), metadata=as_a
        )
        assert [bytes(b.data) for b in got.blocks] == [d.tobytes() for d in data(4, 3)]
        match = stub.MatchPrefix(pb.MatchPrefixRequest(keys=list(keys)), metadata=as_b)
        assert match.num_blocks == 0
        assert (
            stub.DeleteKVCache(
                pb.DeleteKVCacheRequest(keys=list(keys)), metadata=as_b
            ).removed
            == 0
        )
        request = pb.StoreKVCacheRequest(blocks=[pb.Block(name="n", data=b"of b")])
        assert list(stub.StoreKVCache(request, metadata=as_b).stored) == [True]
        mine = stub.RetrieveKVCache(
            pb.RetrieveKVCacheRequest(names=["n"]), metadata=as_a
        )
        assert list(mine.blocks) == []
        with pytest.raises(grpc.RpcError) as err:
            stub.ListKVCacheKeys(pb.ListKVCacheKeysRequest(), metadata=as_b)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_tenant_tokens_need_an_operators_token_and_distinct_tokens() -> None:
    with pytest.raises(ConfigError, match="auth_token"):
        load_config(env={}, overrides={"server.tenant_tokens": {"a": "x"}})
    with pytest.raises(ConfigError, match="its own token"):
        load_config(
            env={},
            overrides={
                "server.auth_token": "ops",
                "server.tenant_tokens": {"a": "x", "b": "x"},
            },
        )
    with pytest.raises(ConfigError, match="its own token"):
        load_config(
            env={},
            overrides={"server.auth_token": "x", "server.tenant_tokens": {"a": "x"}},
        )
