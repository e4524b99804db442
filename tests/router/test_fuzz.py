"""Fuzzing the router: its HTTP API (live, over HTTP) and the engine event decoder.

The router answers every request with 2xx or a clear 4xx (never 500), keeps serving,
and the decoder of engine KV events either decodes a batch or raises
``EventFormatError``: untrusted bytes from a pod never take it down.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvfuzz import JSON, MSGPACK, fuzz
from tests.router import vllm
from tests.router.live import LiveRouter

from kvtier.config import Config
from kvtier.errors import EventFormatError
from kvtier.router.events import decode_batch

MODEL = "org/model"


@pytest.fixture(scope="module")
def router() -> Iterator[LiveRouter]:
    config = Config().replace(
        {
            "router.listen": "127.0.0.1:0",
            "router.block_tokens": 32,
            "router.models": {MODEL: {"layout_id": "L1"}},
            "router.pods": {"p1": {"model": MODEL}},
        }
    )
    live = LiveRouter(config)
    yield live
    live.close()


ROUTE_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([MODEL, "other"]) | JSON,
        "token_ids": st.lists(st.integers(-(2**40), 2**40), max_size=200) | JSON,
        "token_ids_b64": st.binary(max_size=300).map(
            lambda b: base64.b64encode(b).decode()
        )
        | st.text(max_size=40),
        "text": st.text(max_size=50) | JSON,
        "tokenizer": st.text(max_size=30) | JSON,
        "lora": JSON,
        "cache_salt": JSON,
        "pods": st.lists(st.text(max_size=8) | JSON, max_size=4) | JSON,
        "top_k": st.integers(-5, 10**9) | JSON,
    },
)
POD_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=12) | JSON,
        "model": st.sampled_from([MODEL, ""]) | JSON,
        "endpoint": st.sampled_from(["", "tcp://127.0.0.1:1", "ipc:///x"]) | JSON,
        "replay_endpoint": st.text(max_size=20) | JSON,
        "topic": JSON,
        "load": JSON | st.floats(),
    },
)
REQUESTS = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/route"), ROUTE_BODIES.map(json.dumps)),
    st.tuples(st.just("POST"), st.just("/v1/pods"), POD_BODIES.map(json.dumps)),
    st.tuples(
        st.just("POST"),
        st.sampled_from(["/v1/pods/p1/load", "/v1/pods/nope/load"]),
        POD_BODIES.map(json.dumps),
    ),
    st.tuples(
        st.sampled_from(["GET", "DELETE", "POST", "PUT"]),
        st.text(max_size=20).map(lambda p: "/v1/pods/" + quote(p, safe="")),
        st.just(""),
    ),
    st.tuples(
        st.sampled_from(["POST", "GET"]),
        st.sampled_from(["/v1/route", "/v1/pods", "/metrics", "/healthz"]),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    ),
)


def call(base: str, method: str, path: str, body: str) -> tuple[int, bytes]:
    data = body.encode("latin-1", "replace") if body else None
    request = urllib.request.Request(base + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@fuzz(300)
@given(request=REQUESTS)
def test_fuzzed_router_requests_get_an_answer_never_a_500(
    router: LiveRouter, request: tuple[str, str, str]
) -> None:
    method, path, body = request
    if path.startswith("/v1/pods/") and method == "DELETE" and "p1" in path:
        return  # keep the pod the route requests rank
    status, payload = call(router.url, method, path, body)
    assert status in (200, 201, 204, 400, 404, 405, 409, 413), (status, payload)
    if status in (400, 409):  # (a 404 may be aiohttp's own: no route matched)
        assert "error" in json.loads(payload)


def test_after_fuzzing_the_router_still_routes(router: LiveRouter) -> None:
    body = json.dumps({"model": MODEL, "token_ids": list(range(64))})
    status, payload = call(router.url, "POST", "/v1/route", body)
    assert status == 200 and "p1" in {p["pod"] for p in json.loads(payload)["pods"]}


# ---------------------------------------------------------------- engine events

EVENT = st.one_of(
    MSGPACK,
    st.builds(
        lambda n, hash_, parent, form: vllm.stored(
            [hash_] * n, parent, list(range(16 * n)), form=form
        ),
        st.integers(0, 3),
        st.integers(0, 2**64 - 1) | st.binary(max_size=40),
        st.none() | st.integers(0, 2**64 - 1) | st.binary(max_size=40),
        st.sampled_from(["map", "array"]),
    ),
)
BATCHES = st.one_of(
    st.binary(max_size=300),
    MSGPACK.map(msgpack.packb),
    st.builds(
        lambda events, ts: vllm.batch(events, ts),
        st.lists(EVENT, max_size=5),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
)


@fuzz(500)
@given(payload=BATCHES)
def test_fuzzed_event_batches_decode_or_raise_event_format_error(
    payload: bytes,
) -> None:
    try:
        batch = decode_batch(payload)
    except EventFormatError:
        return
    assert batch.num_unknown >= 0 and isinstance(batch.events, list)


def test_the_event_strategy_reaches_real_events() -> None:
    """A control: the generator above does produce batches that decode to events."""
    raw = vllm.batch([vllm.stored([7, 8], None, list(range(32)))])
    assert len(decode_batch(raw).events) == 1


def test_base64_with_non_ascii_characters_is_a_400(router: LiveRouter) -> None:
    """Found by the fuzzer: it was a 500 (an uncaught ValueError)."""
    body = json.dumps({"model": MODEL, "token_ids_b64": "\u0080"})
    status, payload = call(router.url, "POST", "/v1/route", body)
    assert status == 400 and "not base64" in json.loads(payload)["error"]
