"""The node's HTTP admin API, its Prometheus metrics, and its gRPC service."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import grpc
import numpy as np
import pytest
from kvnode import NodeProcess
from prometheus_client.parser import text_string_to_metric_families

from kvtier import Namespace, block_keys
from kvtier.server._grpc import kvcache_pb2 as pb
from kvtier.server._grpc import kvcache_pb2_grpc as pb_grpc
from kvtier.server.grpc_service import name_key


def http(
    node: NodeProcess,
    path: str,
    body: Any = None,
    token: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    data = (
        raw
        if raw is not None
        else (json.dumps(body).encode() if body is not None else None)
    )
    request = urllib.request.Request(
        node.http + path, data=data, method="POST" if data is not None else "GET"
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        payload, status, kind = (
            exc.read(),
            exc.code,
            exc.headers.get("Content-Type", ""),
        )
        exc.close()
    return status, json.loads(payload) if "json" in kind else payload.decode()


def stored_keys(node: NodeProcess, count: int) -> list[bytes]:
    keys = list(
        block_keys(
            Namespace(uuid.uuid4().hex, tenant="acme", block_tokens=1),
            list(range(count)),
        )
    )
    chain = block_keys(
        Namespace(uuid.uuid4().hex, tenant="acme", block_tokens=1), list(range(count))
    )
    with node.client(shared_memory=False) as client:
        assert client.put(chain, [np.ones(1024, np.uint8)] * count)
        client.get(chain)
        client.get(keys)  # misses, for the miss ratio
    return list(chain)


def test_health_readiness_and_status(node: NodeProcess) -> None:
    assert http(node, "/healthz") == (200, {"status": "ok"})
    assert http(node, "/readyz") == (200, {"ready": True})
    stored_keys(node, 3)
    status, body = http(node, "/v1/status")
    assert status == 200 and body["ready"] and body["stats"]["put_blocks"] >= 3
    assert set(body["tiers"]) == {"memory", "disk"}


def test_metrics_cover_every_seed_004_metric(node: NodeProcess) -> None:
    stored_keys(node, 4)
    status, text = http(node, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "kvtier_cache_hit_ratio",
        "kvtier_cache_miss_ratio",
        "kvtier_cache_eviction_rate",
        "kvtier_cache_utilization",
        "kvtier_cache_lookup_latency_seconds",
        "kvtier_cache_storage_latency_seconds",
        "kvtier_cache_transfer_bandwidth_bytes_per_second",
        "kvtier_cache_size_bytes",
        "kvtier_cache_items_count",
        "kvtier_cache_memory_usage_bytes",
        "kvtier_cache_disk_usage_bytes",
        "kvtier_cache_evictions",
        "kvtier_cache_transfer_bytes",
        "kvtier_cache_group_size_bytes",
        "kvtier_cache_group_items_count",
    ):
        assert name in families, name
    hit = families["kvtier_cache_hit_ratio"].samples[0].value
    miss = families["kvtier_cache_miss_ratio"].samples[0].value
    assert 0 < hit < 1 and abs(hit + miss - 1) < 1e-9
    groups = {
        s.labels["group"] for s in families["kvtier_cache_group_items_count"].samples
    }
    assert "acme" in groups
    lookups = families["kvtier_cache_lookup_latency_seconds"].samples
    assert any(s.name.endswith("_count") and s.value > 0 for s in lookups)


def test_json_lookups_for_routers(node: NodeProcess) -> None:
    keys = stored_keys(node, 3)
    hexes = [k.hex() for k in keys] + [bytes(16).hex()]
    status, body = http(node, "/v1/match", {"keys": hexes})
    assert status == 200 and body["num_blocks"] == 3 and len(body["tiers"]) == 3
    assert http(node, "/v1/contains", {"keys": hexes[2:]})[1] == {
        "present": [True, False]
    }
    status, body = http(node, "/v1/keys?group=acme&limit=2")
    assert status == 200 and len(body["keys"]) == 2
    assert all(item["group"] == "acme" for item in body["keys"])


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/match", {"keys": ["zz"]}, "keys[0] must be 32 hex digits"),
        ("/v1/match", {"keys": [], "window": -1}, "window must be a positive int"),
        ("/v1/match", [1, 2], "must be a JSON object"),
        ("/v1/contains", {"keys": "abc"}, "keys must be a list"),
    ],
)
def test_bad_http_requests_get_400_with_a_message(
    node: NodeProcess, path: str, body: Any, message: str
) -> None:
    status, answer = http(node, path, body)
    assert status == 400 and message in answer["error"]


def test_bad_json_and_bad_query(node: NodeProcess) -> None:
    status, answer = http(node, "/v1/match", raw=b"{not json")
    assert status == 400 and "must be JSON" in answer["error"]
    status, answer = http(node, "/v1/keys?limit=zero")
    assert status == 400 and "limit must be an integer" in answer["error"]


def test_openapi_documents_every_route(node: NodeProcess) -> None:
    status, doc = http(node, "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/status",
        "/v1/match",
        "/v1/contains",
        "/v1/keys",
        "/v1/cluster",
        "/openapi.json",
    }


def test_grpc_store_api(node: NodeProcess) -> None:
    with grpc.insecure_channel(node.grpc) as channel:
        stub = pb_grpc.KVCacheServiceStub(channel)
        keys = [uuid.uuid4().bytes for _ in range(3)]
        blocks = [pb.Block(key=k, data=bytes([i]) * 100) for i, k in enumerate(keys)]
        stored = stub.StoreKVCache(pb.StoreKVCacheRequest(blocks=blocks, group="g1"))
        assert list(stored.stored) == [True] * 3
        match = stub.MatchPrefix(pb.MatchPrefixRequest(keys=keys))
        assert match.num_blocks == 3
        got = stub.RetrieveKVCache(pb.RetrieveKVCacheRequest(keys=keys))
        assert [b.data for b in got.blocks] == [b.data for b in blocks]
        listed = stub.ListKVCacheKeys(pb.ListKVCacheKeysRequest(group="g1"))
        assert {k.key for k in listed.keys} == set(keys)
        named = stub.StoreKVCache(
            pb.StoreKVCacheRequest(
                blocks=[pb.Block(name="model1/layer0/batch0", data=b"abc")]
            )
        )
        assert list(named.stored) == [True]
        by_name = stub.RetrieveKVCache(
            pb.RetrieveKVCacheRequest(names=["model1/layer0/batch0"])
        )
        assert by_name.blocks[0].data == b"abc" and by_name.blocks[0].key == name_key(
            "model1/layer0/batch0"
        )
        removed = stub.DeleteKVCache(pb.DeleteKVCacheRequest(keys=keys[1:]))
        assert removed.removed == 2
        with pytest.raises(grpc.RpcError) as err:
            stub.MatchPrefix(pb.MatchPrefixRequest(keys=[b"short"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "16 bytes" in (err.value.details() or "")


def test_every_interface_refuses_a_missing_token(node_factory: Any) -> None:
    node = node_factory(token="t0ken")
    assert http(node, "/healthz")[0] == 200  # probes stay open
    assert http(node, "/metrics")[0] == 401
    assert http(node, "/v1/status", token="wrong")[0] == 401
    assert http(node, "/v1/status", token="t0ken")[0] == 200
    with grpc.insecure_channel(node.grpc) as channel:
        stub = pb_grpc.KVCacheServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.MatchPrefix(pb.MatchPrefixRequest(keys=[bytes(16)]))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.MatchPrefix(
            pb.MatchPrefixRequest(keys=[bytes(16)]),
            metadata=[("authorization", "Bearer t0ken")],
        )
        assert ok.num_blocks == 0
    from kvtier.errors import AuthenticationError

    with pytest.raises(AuthenticationError):
        node.client(token=None)
    with pytest.raises(AuthenticationError):
        node.client(token="nope")
    with node.client() as client:
        client.ping()


def test_grpc_stubs_match_the_proto(tmp_path: Any) -> None:
    from importlib import resources

    from grpc_tools import protoc

    src = resources.files("kvtier").joinpath("..")
    proto_path = "kvtier/server/_grpc/kvcache.proto"
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{src}",
                f"--python_out={tmp_path}",
                str(src.joinpath(proto_path)),
            ]
        )
        == 0
    )
    fresh = (tmp_path / "kvtier/server/_grpc/kvcache_pb2.py").read_text()
    shipped = resources.files("kvtier.server._grpc").joinpath("kvcache_pb2.py")
    assert fresh == shipped.read_text(), "regenerate the stubs (grpc_service.py)"


def test_grafana_dashboard_uses_only_metrics_the_node_exports(
    node: NodeProcess,
) -> None:
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).parents[2] / "deploy/grafana/kvtier-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"kvtier_[a-z_]+", e)}
    stored_keys(node, 1)
    _, text = http(node, "/metrics")
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert used and used <= exported, used - exported
