"""The router without I/O: pods, batches, route requests, store, load, expiry."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest
from tests.router import vllm

from kvtier.config import RouterConfig, RouterModelConfig, RouterPodConfig
from kvtier.core.keys import BlockKey, Namespace, block_keys
from kvtier.errors import ConfigError, RouteError, StorageError, UnknownPodError
from kvtier.router.events import decode_batch
from kvtier.router.router import Router, RouteRequest, RouteResult
from kvtier.router.tokenize import load_tokenizer

BLOCK_TOKENS = 32
MODEL = "org/model"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    def __init__(self, num_blocks: int = 0, error: bool = False, delay: float = 0):
        self.num_blocks, self.error, self.delay = num_blocks, error, delay
        self.asked: list[Sequence[BlockKey]] = []

    async def match(self, keys: Sequence[BlockKey]) -> int:
        self.asked.append(keys)
        await asyncio.sleep(self.delay)
        if self.error:
            raise StorageError("down")
        return min(self.num_blocks, len(keys))

    async def close(self) -> None:
        pass


def make_router(
    store: FakeStore | None = None, tokenizer: str = "", **kwargs: object
) -> Router:
    config = RouterConfig(
        block_tokens=BLOCK_TOKENS,
        models={
            MODEL: RouterModelConfig(layout_id="L1", tenant="t", tokenizer=tokenizer)
        },
        **kwargs,  # type: ignore[arg-type]
    )
    router = Router(config, store, clock=Clock())
    for pod_id in ("a", "b"):
        router.add_pod(pod_id, RouterPodConfig(model=MODEL))
    router.add_pod("other", RouterPodConfig(model="another/model"))
    return router


def feed(router: Router, pod_id: str, tokens: list[int], medium: str = "GPU") -> None:
    hashes = [vllm.as_int(h) for h in vllm.engine_hashes(tokens)]
    payload = vllm.batch([vllm.stored(hashes, None, tokens, medium=medium)])
    pod = router.pods[pod_id]
    router.apply(pod, pod.feed.expected or 0, decode_batch(payload))


def route(router: Router, **kwargs: object) -> RouteResult:
    return asyncio.run(router.route(RouteRequest(MODEL, **kwargs)))  # type: ignore[arg-type]


PROMPT = list(range(1000, 1000 + 4 * BLOCK_TOKENS))


def test_route_keys_are_the_stores_keys_for_the_models_namespace() -> None:
    router = make_router()
    expected = block_keys(
        Namespace(MODEL, layout_id="L1", block_tokens=BLOCK_TOKENS, tenant="t"), PROMPT
    )
    assert list(router.keys(RouteRequest(MODEL, token_ids=PROMPT))) == list(expected)


def test_pods_rank_by_their_cached_prefix_with_reasons() -> None:
    router = make_router()
    feed(router, "a", PROMPT[: 2 * BLOCK_TOKENS])
    feed(router, "b", PROMPT[: 3 * BLOCK_TOKENS], medium="CPU")
    feed(router, "other", PROMPT)
    result = route(router, token_ids=PROMPT)
    assert (result.num_blocks, result.block_tokens) == (4, BLOCK_TOKENS)
    assert [(s.pod_id, s.score, s.prefix_blocks) for s in result.pods] == [
        ("b", pytest.approx(0.6), 3),
        ("a", 0.5, 2),
    ]
    assert result.pods[0].reason.startswith("3 leading blocks cached (3 CPU)")


def test_lora_and_salt_route_into_their_own_namespace() -> None:
    router = make_router()
    hashes = [vllm.as_int(h) for h in vllm.engine_hashes(PROMPT)]
    extra = [(("cache_salt", "u1"),)] + [None] * (len(hashes) - 1)
    payload = vllm.batch(
        [vllm.stored(hashes, None, PROMPT, lora_name="sql", extra_keys=extra)]
    )
    router.apply(router.pods["a"], 0, decode_batch(payload))
    plain = route(router, token_ids=PROMPT)
    salted = route(router, token_ids=PROMPT, lora="sql", cache_salt="u1")
    assert plain.pods[0].prefix_blocks == 0
    assert (salted.pods[0].pod_id, salted.pods[0].prefix_blocks) == ("a", 4)


def test_candidates_are_the_models_pods_or_the_ones_asked_for() -> None:
    router = make_router()
    assert [s.pod_id for s in route(router, token_ids=PROMPT).pods] == ["a", "b"]
    result = route(router, token_ids=PROMPT, pods=("b", "zz", "other"))
    assert [s.pod_id for s in result.pods] == ["b"]
    assert result.unknown_pods == ("zz",)


def test_the_shared_store_counts_for_every_pod() -> None:
    store = FakeStore(num_blocks=3)
    router = make_router(store)
    feed(router, "a", PROMPT[:BLOCK_TOKENS])
    result = route(router, token_ids=PROMPT)
    assert result.num_store_blocks == 3
    assert [(s.pod_id, s.blocks["store"]) for s in result.pods] == [("a", 2), ("b", 3)]
    assert list(store.asked[0]) == list(router.keys(RouteRequest(MODEL, PROMPT)))


@pytest.mark.parametrize("store", [FakeStore(3, error=True), FakeStore(3, delay=1.0)])
def test_a_store_that_fails_or_is_slow_counts_nothing_and_routing_goes_on(
    store: FakeStore,
) -> None:
    router = make_router(store, store_timeout_seconds=0.05)
    feed(router, "b", PROMPT)
    result = route(router, token_ids=PROMPT)
    assert result.num_store_blocks == 0 and result.pods[0].pod_id == "b"
    assert router.store_errors == 1


def test_load_is_validated_and_blended() -> None:
    router = make_router()
    feed(router, "a", PROMPT)
    feed(router, "b", PROMPT)
    router.set_load("a", 0.4)
    assert [s.pod_id for s in route(router, token_ids=PROMPT).pods] == ["b", "a"]
    with pytest.raises(ConfigError, match="load must be a finite number >= 0"):
        router.set_load("a", -1)
    with pytest.raises(UnknownPodError, match="no pod 'zz'"):
        router.set_load("zz", 0.1)


def test_removing_a_pod_withdraws_its_blocks_and_frees_its_slot() -> None:
    router = make_router()
    feed(router, "a", PROMPT)
    slot = router.pods["a"].slot
    router.remove_pod("a")
    assert router.index.num_keys == 0
    assert router.add_pod("c", RouterPodConfig(model=MODEL)).slot == slot
    with pytest.raises(ConfigError, match="already followed"):
        router.add_pod("c", RouterPodConfig(model=MODEL))
    with pytest.raises(ConfigError, match=r"pod d.model must name the model"):
        router.add_pod("d", RouterPodConfig())


def test_a_silent_pod_expires_and_loses_its_credit() -> None:
    router = make_router(silence_seconds=30.0)
    clock = router.clock
    assert isinstance(clock, Clock)
    for pod_id in ("a", "b"):
        router.heard(router.pods[pod_id])
    feed(router, "a", PROMPT)
    clock.now += 20
    router.heard(router.pods["b"])
    clock.now += 15
    assert router.expire() == ["a"]
    assert router.pods["a"].state == "silent"
    assert router.pods["a"].counters.resyncs == {"silence": 1}
    assert route(router, token_ids=PROMPT).pods[0].prefix_blocks == 0


def test_requests_without_a_usable_prompt_say_why() -> None:
    router = make_router()
    with pytest.raises(RouteError, match="needs token_ids or text"):
        route(router)
    with pytest.raises(RouteError, match="text needs a tokenizer"):
        route(router, text="hello")
    with pytest.raises(RouteError, match="token_ids: token ids must be ints"):
        route(router, token_ids=[1, -2])


def test_without_a_tokenizer_package_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    load_tokenizer.cache_clear()
    with pytest.raises(RouteError, match="install the 'tokenizers' or 'transformers'"):
        route(make_router(tokenizer="some/model"), text="hello", tokenizer="some/model")


def test_text_is_tokenized_with_a_local_tokenizer_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A stand-in for the ``tokenizers`` package: one id per character."""

    class Tokenizer:
        @staticmethod
        def from_file(path: str) -> Tokenizer:
            assert json.loads(Path(path).read_text()) == {"model": "chars"}
            return Tokenizer()

        def encode(self, text: str) -> types.SimpleNamespace:
            return types.SimpleNamespace(ids=[ord(c) for c in text])

    monkeypatch.setitem(
        sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=Tokenizer)
    )
    load_tokenizer.cache_clear()
    (tmp_path / "tokenizer.json").write_text('{"model": "chars"}')
    text = "".join(chr(t) for t in PROMPT)
    router = make_router(tokenizer=str(tmp_path))
    feed(router, "b", PROMPT)
    result = route(router, text=text, tokenizer=str(tmp_path))
    assert (result.pods[0].pod_id, result.pods[0].prefix_blocks) == ("b", 4)
    assert route(router, text=text).pods[0].prefix_blocks == 4  # the model's own
    load_tokenizer.cache_clear()


def test_a_request_cannot_make_the_router_open_a_path_of_its_choosing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    opened: list[str] = []

    class Tokenizer:
        @staticmethod
        def from_file(path: str) -> Tokenizer:
            opened.append(path)
            return Tokenizer()

    monkeypatch.setitem(
        sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=Tokenizer)
    )
    load_tokenizer.cache_clear()
    secret = tmp_path / "tokenizer.json"
    secret.write_text("{}")
    for name in (str(secret), str(tmp_path), "/etc/passwd", "../../etc"):
        with pytest.raises(RouteError, match="is not configured"):
            route(make_router(), text="hello", tokenizer=name)
    assert opened == []
    load_tokenizer.cache_clear()
