"""Fuzzing a live node on every interface: protocol bodies, HTTP admin, gRPC.

Whatever comes in, the node answers within a deadline (a reply, an error, or an error
and a hang-up for a frame it cannot parse), never answers HTTP 500 or gRPC UNKNOWN
(an unexpected exception in a handler), never dies, and its memory stays bounded.
"""

from __future__ import annotations

import json
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvfuzz import JSON, MSGPACK, fuzz
from kvnode import NodeProcess, start_node
from kvwire import read_frame

from kvtier import protocol as proto
from kvtier.protocol import Kind, Op
from kvtier.server._grpc import kvcache_pb2 as pb
from kvtier.server._grpc import kvcache_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(tmp_path_factory.mktemp("fuzz"))
    with node.client() as client:
        client.ping()
    node.rss_start = rss_kib(node)  # type: ignore[attr-defined]
    yield node
    node.stop()


def rss_kib(node: NodeProcess) -> int:
    with open(f"/proc/{node.proc.pid}/status") as status:
        line = next(li for li in status if li.startswith("VmRSS:"))
    return int(line.split()[1])


# ---------------------------------------------------------------- the protocol

VALUES = MSGPACK
KEYS = st.lists(
    st.binary(min_size=16, max_size=16) | st.binary(max_size=24), max_size=6
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "keys": KEYS | VALUES,
        "sizes": st.lists(st.integers(-3, 3000), max_size=6) | VALUES,
        "group": st.text(max_size=30) | VALUES,
        "parent": st.binary(max_size=20) | VALUES,
        "parents": st.lists(st.none() | st.binary(max_size=17), max_size=6) | VALUES,
        "chained": VALUES,
        "window": st.integers(-5, 10**12) | VALUES,
        "limit": st.integers(-5, 10**12) | VALUES,
        "exact": VALUES,
        "timeout": VALUES,
        "id": VALUES,
        "version": VALUES,
        "token": VALUES,
    },
).map(lambda body: {**body})
OPS = st.sampled_from([op for op in Op if op != Op.HELLO]) | st.integers(0, 2**16 - 1)


def answer_or_hang_up(sock: socket.socket) -> bool:
    """The next frame; False when the node hung up (after an error frame)."""
    try:
        kind, body = read_frame(sock)
    except ConnectionError:
        return False
    assert kind in (Kind.REPLY, Kind.ERROR)
    if kind == Kind.ERROR:
        assert body["code"] in {"bad_frame", "bad_request", "unknown_op", "unavailable"}
    return True


@fuzz(300)
@given(requests=st.lists(st.tuples(OPS, BODIES, st.binary(max_size=3000)), max_size=4))
def test_fuzzed_bodies_get_an_answer_and_the_connection_stays_in_step(
    target: NodeProcess, requests: list[tuple[int, dict[str, Any], bytes]]
) -> None:
    with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
        sock.sendall(proto.encode_frame(Kind.REQUEST, Op.HELLO, 1, {"version": 1}))
        assert answer_or_hang_up(sock)
        for i, (op, body, payload) in enumerate(requests):
            frame = proto.encode_frame(Kind.REQUEST, op, i + 2, body, len(payload))
            sock.sendall(frame + payload)
            if not answer_or_hang_up(sock):
                return
        sock.sendall(proto.encode_frame(Kind.REQUEST, Op.PING, 99, {}))
        assert read_frame(sock)[0] == Kind.REPLY  # still in step after all that


# ---------------------------------------------------------------- HTTP admin

PATHS = st.sampled_from(
    ["/healthz", "/readyz", "/metrics", "/v1/status", "/v1/match", "/v1/contains",
     "/v1/keys", "/v1/cluster", "/openapi.json"]
) | st.text(max_size=30).map(lambda p: "/" + p.replace("\n", ""))  # fmt: skip
HTTP_BODIES = (
    st.fixed_dictionaries(
        {},
        optional={
            "keys": st.lists(st.text(max_size=40) | JSON, max_size=5),
            "window": JSON,
        },
    ).map(lambda b: json.dumps(b).encode())
    | JSON.map(lambda b: json.dumps(b).encode())
    | st.binary(max_size=300)
)
QUERIES = st.dictionaries(
    st.sampled_from(["limit", "group", "x"]), st.text(max_size=12)
)


@fuzz(300)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=PATHS,
    query=QUERIES,
    body=HTTP_BODIES,
)
def test_fuzzed_http_requests_never_get_a_500(
    target: NodeProcess, method: str, path: str, query: dict[str, str], body: bytes
) -> None:
    from urllib.parse import quote, urlencode

    url = (
        target.http + quote(path, safe="/") + ("?" + urlencode(query) if query else "")
    )
    request = urllib.request.Request(
        url, data=body if method != "GET" else None, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = response.status
            response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status = exc.code
            payload = exc.read()
        if status == 400:  # a bad request is explained
            assert "error" in json.loads(payload)
    assert status in (200, 400, 404, 405, 413), status


# ---------------------------------------------------------------- gRPC

BLOCKS = st.lists(
    st.builds(
        pb.Block,
        key=st.binary(max_size=20),
        name=st.text(max_size=20),
        data=st.binary(max_size=200),
    ),
    max_size=4,
)
GRPC_REQUESTS = st.one_of(
    st.builds(
        lambda b, g, p, u: ("StoreKVCache", pb.StoreKVCacheRequest(
            blocks=b, group=g, parent=p, unchained=u)),
        BLOCKS, st.text(max_size=20), st.binary(max_size=20), st.booleans(),
    ),
    st.builds(
        lambda k, n: ("RetrieveKVCache", pb.RetrieveKVCacheRequest(keys=k, names=n)),
        KEYS, st.lists(st.text(max_size=20), max_size=4),
    ),
    st.builds(
        lambda k, n: ("DeleteKVCache", pb.DeleteKVCacheRequest(keys=k, names=n)),
        KEYS, st.lists(st.text(max_size=20), max_size=4),
    ),
    st.builds(
        lambda g, n: ("ListKVCacheKeys", pb.ListKVCacheKeysRequest(group=g, limit=n)),
        st.text(max_size=20), st.integers(0, 2**32 - 1),
    ),
    st.builds(
        lambda k, w: ("MatchPrefix", pb.MatchPrefixRequest(keys=k, window=w)),
        KEYS, st.integers(0, 2**32 - 1),
    ),
)  # fmt: skip
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.fixture(scope="module")
def stub(target: NodeProcess) -> Iterator[pb_grpc.KVCacheServiceStub]:
    with grpc.insecure_channel(target.grpc) as channel:
        yield pb_grpc.KVCacheServiceStub(channel)


@fuzz(300)
@given(call=GRPC_REQUESTS)
def test_fuzzed_grpc_requests_get_ok_or_invalid_argument(
    stub: pb_grpc.KVCacheServiceStub, call: tuple[str, Any]
) -> None:
    method, request = call
    try:
        getattr(stub, method)(request, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details())


@fuzz(100)
@given(raw=st.binary(max_size=200), method=st.sampled_from(sorted(
    ["StoreKVCache", "RetrieveKVCache", "DeleteKVCache", "ListKVCacheKeys",
     "MatchPrefix"])))  # fmt: skip
def test_undecodable_grpc_messages_are_refused_not_crashing(
    target: NodeProcess, raw: bytes, method: str
) -> None:
    with grpc.insecure_channel(target.grpc) as channel:
        call = channel.unary_unary(f"/kvtier.v1.KVCacheService/{method}")
        try:
            call(raw, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() not in ALLOWED:  # grpc.aio refuses what does not parse
                details = (exc.details() or "").lower()  # before any handler runs
                assert "decodeerror" in details or "deserializ" in details, details


# ---------------------------------------------------------------- afterwards


def test_after_all_that_the_node_serves_with_bounded_memory(
    target: NodeProcess,
) -> None:
    assert target.proc.poll() is None
    with target.client() as client:
        client.ping()
        stats = client.stats()["stats"]
    assert stats["open_reservations"] == 0 and stats["held_slots"] == 0
    growth = rss_kib(target) - target.rss_start  # type: ignore[attr-defined]
    assert growth < 96 * 1024, f"RSS grew {growth} KiB"
    assert math.isfinite(growth)


def test_an_empty_put_is_an_empty_answer(target: NodeProcess) -> None:
    """Found by the fuzzer: a put of no blocks used to kill the session (an empty
    key chain claimed one parent) and fail gRPC's StoreKVCache with UNKNOWN."""
    with target.client() as client:
        assert client.put([], []).stored == ()
        with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
            sock.sendall(proto.encode_frame(Kind.REQUEST, Op.HELLO, 1, {"version": 1}))
            read_frame(sock)
            sock.sendall(
                proto.encode_frame(Kind.REQUEST, Op.PUT, 2, {"keys": [], "sizes": []})
            )
            assert read_frame(sock) == (Kind.REPLY, {"stored": []})
    with grpc.insecure_channel(target.grpc) as channel:
        stub = pb_grpc.KVCacheServiceStub(channel)
        request = pb.StoreKVCacheRequest(parent=bytes(16))
        assert list(stub.StoreKVCache(request, timeout=10).stored) == []
