"""Limits per request and per connection: keys per request, open reservations and
leases per connection, time to authenticate, connections."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from typing import Any

import grpc
import numpy as np
import pytest
from kvnode import NodeProcess, wait_until
from kvwire import closed_by_peer, hello, read_frame

from kvtier import Namespace, block_keys
from kvtier import protocol as proto
from kvtier.errors import RemoteError
from kvtier.protocol import Kind, Op
from kvtier.server._grpc import kvcache_pb2 as pb
from kvtier.server._grpc import kvcache_pb2_grpc as pb_grpc


@pytest.fixture
def limited(node_factory: Any) -> NodeProcess:
    node: NodeProcess = node_factory(
        "server.max_keys_per_request=100",
        "server.max_open_per_connection=3",
        "server.hello_timeout=0.5",
        "server.max_connections=4",
        token="limits",
    )
    return node


def keys(count: int) -> list[bytes]:
    ns = Namespace(uuid.uuid4().hex, block_tokens=1)
    return list(block_keys(ns, list(range(count))))


def test_too_many_keys_is_a_clear_error_on_every_interface(
    limited: NodeProcess,
) -> None:
    with limited.client() as client:
        with pytest.raises(RemoteError, match="max_keys_per_request=100"):
            client.match(keys(101))
        with pytest.raises(RemoteError, match="max_keys_per_request"):
            client.put(keys(101), [b"x"] * 101)
        assert client.match(keys(100)).num_blocks == 0  # the connection goes on
    body = json.dumps({"keys": [k.hex() for k in keys(101)]}).encode()
    request = urllib.request.Request(limited.http + "/v1/contains", data=body)
    request.add_header("Authorization", "Bearer limits")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    err.value.close()
    with grpc.insecure_channel(limited.grpc) as channel:
        stub = pb_grpc.KVCacheServiceStub(channel)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.MatchPrefix(
                pb.MatchPrefixRequest(keys=keys(101)),
                metadata=[("authorization", "Bearer limits")],
                timeout=10,
            )
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_connection_holds_a_bounded_number_of_reservations_and_leases(
    limited: NodeProcess,
) -> None:
    with limited.client(shared_memory=True, pool_size=1) as client:
        held = [client.reserve(keys(1), [4096]) for _ in range(2)]
        stored = keys(1)
        assert client.put(stored, [np.ones(4096, np.uint8)])
        held.append(client.lease(stored))
        with pytest.raises(RemoteError, match="max_open_per_connection=3"):
            client.reserve(keys(1), [4096])
        with pytest.raises(RemoteError, match="max_open_per_connection=3"):
            client.lease(stored)
        client.abort(held[0])  # room again
        assert client.reserve(keys(1), [4096]).statuses == ["reserved"]


def test_strangers_that_never_say_hello_are_dropped(limited: NodeProcess) -> None:
    with limited.client(pool_size=1) as client:  # authenticated: never timed out
        strangers = [
            socket.create_connection(("127.0.0.1", limited.port), timeout=10)
            for _ in range(3)  # with the client, all 4 connection slots are taken
        ]
        with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as extra:
            assert closed_by_peer(extra)  # over max_connections: refused at once
        for sock in strangers:
            assert closed_by_peer(sock)  # hello_timeout ran out
            sock.close()
        client.ping()  # the authenticated connection outlived them
        wait_until(
            lambda: client.stats()["connections"] == 1, 10, "the strangers to go"
        )
        with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as late:
            assert hello(late, "limits")[0] == Kind.REPLY  # a slot is free again


def test_a_half_sent_frame_before_hello_is_dropped_too(limited: NodeProcess) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        frame = proto.encode_frame(Kind.REQUEST, Op.HELLO, 1, {"version": 1})
        sock.sendall(frame[:-3])  # the body never completes
        assert closed_by_peer(sock)
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(proto.encode_frame(Kind.REQUEST, Op.PING, 1, {}))
        kind, body = read_frame(sock)
        assert kind == Kind.ERROR and body["code"] == "unauthorized"
