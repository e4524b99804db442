"""A live ``kvtier route`` fed by real ZMQ publishers speaking vLLM's wire format."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from tests.router import vllm
from tests.router.live import LiveRouter, Publisher

from kvtier.config import Config

MODEL = "org/model"
BLOCK_TOKENS = 32  # two 16-token engine blocks per kvtier block


def prompt(num_blocks: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100_000) for _ in range(num_blocks * BLOCK_TOKENS)]


def hashes_of(tokens: list[int], as_bytes: bool = False) -> list[Any]:
    raw = vllm.engine_hashes(tokens)
    return list(raw) if as_bytes else [vllm.as_int(h) for h in raw]


def stored(
    tokens: list[int],
    start: int = 0,
    stop: int | None = None,
    *,
    form: vllm.Form = "map",
    medium: str = "GPU",
    as_bytes: bool = False,
) -> Any:
    """BlockStored of engine blocks [start, stop) of a prompt."""
    hashes = hashes_of(tokens, as_bytes)
    stop = len(hashes) if stop is None else stop
    parent = hashes[start - 1] if start else None
    return vllm.stored(
        hashes[start:stop],
        parent,
        tokens[start * 16 : stop * 16],
        medium=medium,
        form=form,
    )


def removed(tokens: list[int], start: int, stop: int, form: vllm.Form = "map") -> Any:
    return vllm.removed(hashes_of(tokens)[start:stop], form=form)


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


Cluster = tuple[LiveRouter, dict[str, Publisher]]


def start(
    context: zmq.Context[zmq.Socket[bytes]],
    pods: dict[str, dict[str, Any]],
    **router: Any,
) -> Cluster:
    """Publishers for ``pods`` ({id: {"replay": bool}}) and a router following them."""
    publishers = {
        pod_id: Publisher(context, replay=spec.get("replay", False))
        for pod_id, spec in pods.items()
    }
    config = Config().replace(
        {
            "router.listen": "127.0.0.1:0",
            "router.block_tokens": BLOCK_TOKENS,
            "router.pods": {
                pod_id: {
                    "model": MODEL,
                    "endpoint": pub.endpoint,
                    "replay_endpoint": pub.replay_endpoint,
                }
                for pod_id, pub in publishers.items()
            },
            **{f"router.{k}": v for k, v in router.items()},
        }
    )
    live = LiveRouter(config)
    for pub in publishers.values():
        pub.wait_subscribed()
    return live, publishers


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, context: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(pods: dict[str, dict[str, Any]], **router: Any) -> Cluster:
        made.append(start(context, pods, **router))
        return made[-1]

    yield make
    for live, publishers in made:
        live.close()
        for pub in publishers.values():
            pub.close()


def batches(n: int) -> Any:
    return lambda pod: pod["batches"] == n


@pytest.mark.parametrize("form", ["map", "array"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_both_wire_forms_feed_the_index_and_routes_rank_exactly(
    cluster: Any, form: vllm.Form, as_bytes: bool
) -> None:
    live, pubs = cluster({"a": {}, "b": {}, "c": {}})
    doc = prompt(4, seed=1)
    pubs["a"].send([stored(doc, 0, 8, form=form, as_bytes=as_bytes)], form=form)
    pubs["b"].send([stored(doc, 0, 4, form=form, as_bytes=as_bytes)], form=form)
    pubs["c"].send(
        [stored(doc, 0, 8, form=form, medium="CPU", as_bytes=as_bytes)], form=form
    )
    for pod_id in pubs:
        live.wait_pod(pod_id, batches(1))
    answer = live.route(MODEL, doc)
    assert answer["num_blocks"] == 4 and answer["block_tokens"] == BLOCK_TOKENS
    assert [(p["pod"], p["score"], p["blocks"]) for p in answer["pods"]] == [
        ("a", 1.0, {"GPU": 4, "CPU": 0, "store": 0}),
        ("c", 0.8, {"GPU": 0, "CPU": 4, "store": 0}),
        ("b", 0.5, {"GPU": 2, "CPU": 0, "store": 0}),
    ]
    assert answer["pods"][0]["reason"].startswith("4 leading blocks cached (4 GPU)")


def test_events_of_a_pod_apply_in_order(cluster: Any) -> None:
    live, pubs = cluster({"a": {}})
    x, y = prompt(2, seed=2), prompt(2, seed=3)
    pubs["a"].send([stored(x)])
    pubs["a"].send([removed(x, 2, 4), stored(y)])
    pubs["a"].send([removed(y, 0, 4)])
    pubs["a"].send([stored(y, 0, 4), stored(x, 2, 4)])
    live.wait_pod("a", batches(4))
    assert live.ranking(MODEL, x) == [("a", 2)]
    assert live.ranking(MODEL, y) == [("a", 2)]
    pubs["a"].send([removed(x, 3, 4)], form="array")
    live.wait_pod("a", batches(5))
    assert live.ranking(MODEL, x) == [("a", 1)]


def test_a_gap_without_replay_drops_the_pods_index(cluster: Any) -> None:
    live, pubs = cluster({"a": {}})
    x, y, z = prompt(2, seed=4), prompt(2, seed=5), prompt(2, seed=6)
    pubs["a"].send([stored(x)])
    pubs["a"].send([stored(y)], lost=True)
    pubs["a"].send([stored(z)])
    pod = live.wait_pod("a", batches(2))
    assert pod["anomalies"] == {"gap": 1} and pod["resyncs"] == {"gap": 1}
    assert pod["next_seq"] == 3
    assert live.ranking(MODEL, x) == [("a", 0)]  # may be stale: dropped
    assert live.ranking(MODEL, z) == [("a", 2)]


def test_a_gap_with_replay_recovers_without_dropping(cluster: Any) -> None:
    live, pubs = cluster({"a": {"replay": True}})
    x, y, z = prompt(2, seed=7), prompt(2, seed=8), prompt(2, seed=9)
    pubs["a"].send([stored(x)])
    pubs["a"].send([stored(y)], lost=True)
    pubs["a"].send([removed(x, 0, 1)], lost=True)
    pubs["a"].send([stored(z)])
    pod = live.wait_pod("a", batches(4))
    assert pubs["a"].replay_requests == [1]
    assert pod["anomalies"] == {"gap": 1}  # batch 3 came in the replay, then live
    assert pod["resyncs"] == {} and pod["replays"] == {"complete": 1}
    assert live.ranking(MODEL, x) == [("a", 0)]  # removed in a replayed batch
    assert live.ranking(MODEL, y) == [("a", 2)]
    assert live.ranking(MODEL, z) == [("a", 2)]


def test_a_pod_that_restarts_empty_is_no_longer_credited(
    cluster: Any, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    live, pubs = cluster({"a": {}, "b": {}})
    old, new = prompt(3, seed=10), prompt(3, seed=11)
    for pod_id in ("a", "b"):
        pubs[pod_id].send([stored(old)])
    live.wait_pod("a", batches(1))
    pubs["a"].restart(context)
    pod = live.wait_pod("a", lambda p: p["resyncs"] == {"disconnect": 1})
    assert pod["engine_blocks"] == 0 and pod["next_seq"] is None
    pubs["a"].send([stored(new)])
    live.wait_pod("a", batches(2))
    live.wait_pod("b", batches(1))
    assert live.ranking(MODEL, old) == [("b", 3), ("a", 0)]
    assert live.ranking(MODEL, new) == [("a", 3), ("b", 0)]


def test_numbers_going_back_to_newer_batches_are_a_restart(cluster: Any) -> None:
    """Without a dropped connection to tell (a pod behind a proxy, say), the
    numbers starting over with newer timestamps give the restart away."""
    live, pubs = cluster({"a": {}})
    old, new = prompt(2, seed=23), prompt(2, seed=24)
    pubs["a"].send([stored(old)])
    pubs["a"].send([stored(old, 4, 4)])
    pubs["a"].seq = 0  # same socket, numbers start over
    pubs["a"].send([stored(new)])
    pod = live.wait_pod("a", batches(3))
    assert pod["anomalies"] == {"restart": 1} and pod["resyncs"] == {"restart": 1}
    assert live.ranking(MODEL, old) == [("a", 0)]
    assert live.ranking(MODEL, new) == [("a", 2)]


def test_after_a_restart_missed_batches_are_replayed_from_zero(
    cluster: Any, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    live, pubs = cluster({"a": {"replay": True}})
    old, new = prompt(2, seed=12), prompt(2, seed=13)
    pubs["a"].send([stored(old)])
    live.wait_pod("a", batches(1))
    pubs["a"].restart(context)
    live.wait_pod("a", lambda p: p["resyncs"] == {"disconnect": 1})
    pubs["a"].send([stored(new, 0, 2)], lost=True)  # the new process's first batch
    pubs["a"].send([stored(new, 2, 4)])
    pod = live.wait_pod("a", lambda p: p["next_seq"] == 2)
    assert pubs["a"].replay_requests == [0]
    assert pod["anomalies"] == {"first": 1} and pod["replays"] == {"complete": 1}
    assert live.ranking(MODEL, old) == [("a", 0)]
    assert live.ranking(MODEL, new) == [("a", 2)]


def test_all_blocks_cleared_withdraws_the_pods_blocks(cluster: Any) -> None:
    live, pubs = cluster({"a": {}})
    x = prompt(2, seed=14)
    pubs["a"].send([stored(x)])
    pubs["a"].send([vllm.cleared()], form="map")
    pubs["a"].send([vllm.cleared(form="array"), stored(x, 0, 2)], form="array")
    pod = live.wait_pod("a", batches(3))
    assert pod["events"] == {"BlockStored": 2, "AllBlocksCleared": 2}
    assert pod["engine_blocks"] == 2
    assert live.ranking(MODEL, x) == [("a", 1)]


def test_a_silent_pod_expires_and_comes_back_when_heard(cluster: Any) -> None:
    live, pubs = cluster({"a": {}, "b": {}}, silence_seconds=0.3)
    x = prompt(2, seed=15)
    pubs["a"].send([stored(x)])
    live.wait_pod("a", batches(1))
    pod = live.wait_pod("a", lambda p: p["state"] == "silent")
    assert pod["resyncs"] == {"silence": 1} and pod["engine_blocks"] == 0
    assert live.ranking(MODEL, x) == [("a", 0), ("b", 0)]
    pubs["a"].send([stored(x)])
    pod = live.wait_pod("a", batches(2))
    # heard again after its expiry: a first contact (it may well expire again soon)
    assert pod["anomalies"] == {"first": 1} and pod["engine_block_ops"]["stored"] == 8


def test_a_late_router_replays_the_pods_history(
    cluster: Any, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    live, _ = cluster({})
    pub = Publisher(context, replay=True)
    try:
        x, y = prompt(2, seed=16), prompt(2, seed=17)
        pub.send([stored(x)])  # nobody listens yet
        pub.send([stored(y)])
        status, body = live.request(
            "POST",
            "/v1/pods",
            {
                "id": "late",
                "model": MODEL,
                "endpoint": pub.endpoint,
                "replay_endpoint": pub.replay_endpoint,
            },
        )
        assert status == 201 and body["state"] == "waiting"
        pub.wait_subscribed()
        pub.send([removed(y, 0, 1)])
        pod = live.wait_pod("late", batches(3))
        assert pub.replay_requests == [0] and pod["resyncs"] == {}
        assert live.ranking(MODEL, x) == [("late", 2)]
        assert live.ranking(MODEL, y) == [("late", 0)]
    finally:
        pub.close()


def test_pods_come_and_go_through_the_api(
    cluster: Any, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    live, pubs = cluster({"a": {}})
    x = prompt(2, seed=18)
    pub = Publisher(context)
    try:
        spec = {"id": "b", "model": MODEL, "endpoint": pub.endpoint}
        assert live.request("POST", "/v1/pods", spec)[0] == 201
        assert live.request("POST", "/v1/pods", spec) == (
            409,
            {"error": "pod 'b' is already followed"},
        )
        pub.wait_subscribed()
        pub.send([stored(x)])
        live.wait_pod("b", batches(1))
        assert live.ranking(MODEL, x) == [("b", 2), ("a", 0)]
        assert live.request("DELETE", "/v1/pods/b")[0] == 204
        assert live.ranking(MODEL, x) == [("a", 0)]
        assert [p["id"] for p in live.get("/v1/pods")["pods"]] == ["a"]
        assert live.request("DELETE", "/v1/pods/b") == (404, {"error": "no pod 'b'"})
    finally:
        pub.close()


def test_reported_load_reorders_pods_with_equal_prefixes(cluster: Any) -> None:
    live, pubs = cluster({"a": {}, "b": {}})
    x = prompt(2, seed=19)
    for pub in pubs.values():
        pub.send([stored(x)])
    for pod_id in pubs:
        live.wait_pod(pod_id, batches(1))
    assert live.request("POST", "/v1/pods/a/load", {"load": 0.4}) == (
        200,
        {"pod": "a", "load": 0.4},
    )
    answer = live.route(MODEL, x, top_k=1)
    assert [(p["pod"], p["score"], p["load"]) for p in answer["pods"]] == [
        ("b", 1.0, 0.0)
    ]
    assert live.pod("a")["load"] == 0.4


def test_pods_publishing_to_the_routers_bound_socket_are_added_by_topic(
    cluster: Any, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    live, _ = cluster({}, bind_endpoint="tcp://127.0.0.1:*")
    endpoint = live.service.ingest.bound_endpoint
    pub = Publisher(context, topic=f"kv@pod-9@{MODEL}", connect=endpoint)
    try:
        pub.wait_subscribed()
        x = prompt(2, seed=20)
        pub.send([stored(x)])
        pod = live.wait_pod("pod-9", batches(1))
        assert (pod["model"], pod["endpoint"]) == (MODEL, "")
        assert live.ranking(MODEL, x) == [("pod-9", 2)]
    finally:
        pub.close()


def test_malformed_messages_drop_the_pods_index_and_are_counted(cluster: Any) -> None:
    live, pubs = cluster({"a": {}})
    x = prompt(2, seed=21)
    pubs["a"].send([stored(x)])
    pubs["a"].send_raw([b"", (1).to_bytes(8, "big"), b"\xc1 not msgpack"])
    pubs["a"].send_raw([b"", b"short"])
    pod = live.wait_pod("a", lambda p: sum(p["resyncs"].values()) == 2)
    assert pod["resyncs"] == {"malformed": 2} and pod["engine_blocks"] == 0


def test_bad_requests_say_what_is_wrong(cluster: Any) -> None:
    live, _ = cluster({"a": {}})
    cases = [
        ("POST", "/v1/route", {"token_ids": [1]}, 400, "model is required"),
        ("POST", "/v1/route", {"model": MODEL}, 400, "needs token_ids or text"),
        (
            "POST",
            "/v1/route",
            {"model": MODEL, "token_ids": "x"},
            400,
            "must be a list",
        ),
        ("POST", "/v1/pods", {"id": "z"}, 400, "pod z.model must name"),
        (
            "POST",
            "/v1/pods",
            {"id": "z", "model": "m", "endpoint": "http://x"},
            400,
            "must be a ZMQ endpoint",
        ),
        ("POST", "/v1/pods/a/load", {"load": "high"}, 400, "load must be a number"),
        ("POST", "/v1/pods/zz/load", {"load": 1}, 404, "no pod 'zz'"),
        ("GET", "/v1/pods/zz", None, 404, "no pod 'zz'"),
    ]
    for method, path, body, status, message in cases:
        got_status, got = live.request(method, path, body)
        assert got_status == status and message in got["error"], (path, body, got)
    status, got = live.request("POST", "/v1/route", None)
    assert status == 400 and "must be JSON" in got["error"]


def test_metrics_health_and_openapi(cluster: Any) -> None:
    live, pubs = cluster({"a": {}})
    x = prompt(2, seed=22)
    pubs["a"].send([stored(x)])
    live.wait_pod("a", batches(1))
    live.route(MODEL, x)
    assert live.get("/healthz") == {"status": "ok", "pods": 1, "live": 1}
    metrics = live.get("/metrics")
    for line in (
        "kvtier_router_global_index_size 2.0",
        'kvtier_router_pods{state="live"} 1.0',
        'kvtier_router_pod_engine_blocks{pod="a"} 4.0',
        'kvtier_router_events_total{pod="a",type="BlockStored"} 1.0',
        'kvtier_router_engine_blocks_total{op="stored",pod="a"} 4.0',
        "kvtier_router_cache_lookup_latency_seconds_count 1.0",
        'kvtier_router_cache_hit_ratio_bucket{le="1.0"} 1.0',
    ):
        assert line in metrics, line
    paths = live.get("/openapi.json")["paths"]
    app_routes = {
        (r.method.lower(), r.resource.canonical)  # type: ignore[union-attr]
        for r in live.service._runner.app.router.routes()  # type: ignore[union-attr]
        if r.method != "HEAD"
    }
    documented = {
        (method, path)
        for path, ops in paths.items()
        for method in ops
        if method != "parameters"
    }
    assert app_routes == documented


def test_with_a_token_every_path_but_health_and_openapi_needs_it(cluster: Any) -> None:
    live, _ = cluster({"a": {}}, auth_token="s3cret")
    routes = sorted(
        (r.method, r.resource.canonical.replace("{pod_id}", "a"))  # type: ignore[union-attr]
        for r in live.service._runner.app.router.routes()  # type: ignore[union-attr]
        if r.method != "HEAD"
    )
    open_paths = {"/healthz", "/openapi.json"}
    assert len(routes) >= 8
    for method, path in routes:
        body = {} if method == "POST" else None
        for token in (None, "wrong", "s3cre", "s3cret2"):
            status, got = live.request(method, path, body, token=token)
            if path in open_paths:
                assert status == 200, (method, path, token)
            else:
                assert status == 401 and "Bearer" in got["error"], (method, path, token)
    # the right token gets through: reads answer, a bad body is a 400, not a 401
    assert live.request("GET", "/v1/pods", token="s3cret")[0] == 200
    assert live.request("POST", "/v1/route", {}, token="s3cret")[0] == 400
    assert live.request("GET", "/v1/pods/a", token="s3cret")[0] == 200
