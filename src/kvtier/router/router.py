"""The router's state: the pods it follows, the global index, and the route call.

Everything here runs on one asyncio loop (the ``kvtier route`` service's): ingestion
applies each pod's batches between awaits and ``route`` reads the index between them,
so nothing is locked and a route never sees half a batch. The only await in a route
is the shared store's answer, which is bounded by ``router.store_timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.config import RouterConfig, RouterPodConfig, check_router_pod
from kvtier.core.keys import KeyChain, Namespace, block_keys
from kvtier.errors import (
    ConfigError,
    KeyFormatError,
    KVTierError,
    RouteError,
    UnknownPodError,
)
from kvtier.router.chains import PodChains
from kvtier.router.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvtier.router.feed import Feed
from kvtier.router.index import GlobalIndex, SlotSink
from kvtier.router.scorer import Candidate, PodScore, Weights, score_pods
from kvtier.router.store_view import StoreView
from kvtier.router.tokenize import load_tokenizer

__all__ = ["Pod", "PodCounters", "RouteRequest", "RouteResult", "Router"]

log = logging.getLogger(__name__)

_NAMESPACE_CACHE_SIZE = 4096


@dataclass
class PodCounters:
    """What happened to a pod's stream: events by type; batches that were not the
    next one, by verdict; index drops by cause; replays by outcome."""

    batches: int = 0
    events: dict[str, int] = field(default_factory=dict)
    verdicts: dict[str, int] = field(default_factory=dict)
    resyncs: dict[str, int] = field(default_factory=dict)
    replays: dict[str, int] = field(default_factory=dict)

    def count(self, table: dict[str, int], name: str) -> None:
        table[name] = table.get(name, 0) + 1


@dataclass
class Pod:
    """One followed pod. ``state``: waiting (nothing heard yet), live, replaying,
    silent (expired after ``router.silence_seconds``)."""

    pod_id: str
    config: RouterPodConfig
    slot: int
    chains: PodChains
    feed: Feed = field(default_factory=Feed)
    load: float = 0.0
    load_at: float | None = None
    heard_at: float | None = None
    state: str = "waiting"
    data_parallel_rank: int | None = None
    counters: PodCounters = field(default_factory=PodCounters)


@dataclass(frozen=True)
class RouteRequest:
    """A prompt to place.

    Attributes:
        model: The model asked for; only pods serving it are candidates.
        token_ids: The prompt's token ids (preferred), or
        text: the prompt as text, tokenized with ``tokenizer`` (or the model's).
        tokenizer: A local tokenizer for ``text``.
        lora: The LoRA adapter, as the engines name it (their ``lora_name``).
        cache_salt: vLLM's per-request ``cache_salt``, if the prompt has one.
        pods: Restrict the candidates to these pod ids (an endpoint picker's list).
        top_k: Answer only the best ``top_k`` pods (None: all).
    """

    model: str
    token_ids: Sequence[int] | np.ndarray[Any, Any] | None = None
    text: str | None = None
    tokenizer: str | None = None
    lora: str | None = None
    cache_salt: str = ""
    pods: tuple[str, ...] | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class RouteResult:
    """The ranked pods for a prompt, best first, each with its reasons."""

    model: str
    num_blocks: int
    block_tokens: int
    num_store_blocks: int
    pods: list[PodScore]
    unknown_pods: tuple[str, ...] = ()


class Router:
    """Pods, their chains, the global index and the scorer.

    Args:
        config: The ``router`` configuration section.
        store: The shared store's view, or None when there is none.
        clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        config: RouterConfig,
        store: StoreView | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        order = sorted(config.tier_weights.items(), key=lambda kv: -kv[1])
        self.weights = Weights(
            tuple(name.upper() for name, _ in order),
            tuple(weight for _, weight in order),
            config.store_weight,
            config.load_weight,
        )
        self._media = {name: tier for tier, name in enumerate(self.weights.tier_names)}
        self.index = GlobalIndex(len(order))
        self.pods: dict[str, Pod] = {}
        self.store_errors = 0
        self._namespaces: dict[tuple[str, str, str], Namespace] = {}

    def add_pod(self, pod_id: str, pod_config: RouterPodConfig) -> Pod:
        """Starts following a pod (its events are fed in by the ingest loop).

        Raises:
            ConfigError: The id is taken, or the settings are not valid.
        """
        if not pod_id or pod_id in self.pods:
            raise ConfigError(f"pod id {pod_id!r} is empty or already followed")
        check_router_pod(f"pod {pod_id}", pod_config)
        slot = self.index.add_slot()
        chains = PodChains(
            SlotSink(self.index, slot),
            lambda lora, salt: self.namespace(pod_config.model, lora, salt),
            self.config.block_tokens,
            self._media,
            self.config.max_blocks_per_pod,
        )
        pod = self.pods[pod_id] = Pod(pod_id, pod_config, slot, chains)
        return pod

    def remove_pod(self, pod_id: str) -> None:
        """Stops following a pod and withdraws its blocks.

        Raises:
            UnknownPodError: No such pod.
        """
        pod = self.pod(pod_id)
        pod.chains.clear()
        self.index.remove_slot(pod.slot)
        del self.pods[pod_id]

    def pod(self, pod_id: str) -> Pod:
        """Raises UnknownPodError for ids not followed."""
        pod = self.pods.get(pod_id)
        if pod is None:
            raise UnknownPodError(f"no pod {pod_id!r}")
        return pod

    def set_load(self, pod_id: str, load: float) -> None:
        """Records a pod's load (0 idle .. 1 saturated; more is allowed).

        Raises:
            UnknownPodError: No such pod.
            ConfigError: ``load`` is negative or not finite.
        """
        if not math.isfinite(load) or load < 0:
            raise ConfigError(f"load must be a finite number >= 0, got {load!r}")
        pod = self.pod(pod_id)
        pod.load, pod.load_at = load, self.clock()

    def namespace(self, model: str, lora: str | None, salt: str) -> Namespace:
        """The namespace of a model's prompts, as the store keys them (cached)."""
        cache_key = (model, lora or "", salt)
        found = self._namespaces.get(cache_key)
        if found is None:
            if len(self._namespaces) >= _NAMESPACE_CACHE_SIZE:
                self._namespaces.clear()  # salts can be per user: keep it bounded
            found = self._namespaces[cache_key] = self._make_namespace(*cache_key)
        return found

    def _make_namespace(self, model: str, lora: str, salt: str) -> Namespace:
        settings = self.config.models.get(model)
        return Namespace(
            model,
            layout_id=settings.layout_id if settings else "",
            block_tokens=self.config.block_tokens,
            tp_size=settings.tp_size if settings else 1,
            tenant=settings.tenant if settings else "default",
            cache_salt=salt,
            lora_id=lora,
            hash_seed=self.config.hash_seed,
        )

    # --- ingestion ----------------------------------------------------------

    def apply(self, pod: Pod, seq: int, batch: EventBatch) -> None:
        """Applies one batch of a pod's events, in order."""
        pod.feed.applied(seq, batch.ts)
        pod.counters.batches += 1
        pod.data_parallel_rank = batch.data_parallel_rank
        events = pod.counters.events
        for event in batch.events:
            name = type(event).__name__
            events[name] = events.get(name, 0) + 1
            if isinstance(event, BlockStored):
                pod.chains.stored(event)
            elif isinstance(event, BlockRemoved):
                pod.chains.removed(event)
            elif isinstance(event, AllBlocksCleared):
                pod.chains.clear()
        if batch.num_unknown:
            events["unknown"] = events.get("unknown", 0) + batch.num_unknown

    def heard(self, pod: Pod) -> None:
        """The pod published something just now."""
        pod.heard_at = self.clock()
        if pod.state in ("waiting", "silent"):
            pod.state = "live"

    def resync(self, pod: Pod, cause: str) -> None:
        """Drops a pod's blocks and position: its stream can no longer be trusted."""
        log.info("pod %s: dropping its index (%s)", pod.pod_id, cause)
        pod.counters.count(pod.counters.resyncs, cause)
        pod.chains.clear()
        pod.feed.reset()

    def expire(self) -> list[str]:
        """Expires pods silent longer than ``router.silence_seconds``."""
        silence = self.config.silence_seconds
        if not silence:
            return []
        now, expired = self.clock(), []
        for pod in self.pods.values():
            if pod.state == "live" and now - (pod.heard_at or now) > silence:
                self.resync(pod, "silence")
                pod.state = "silent"
                expired.append(pod.pod_id)
        return expired

    # --- routing ------------------------------------------------------------

    async def route(self, request: RouteRequest) -> RouteResult:
        """Ranks the pods for a prompt.

        Raises:
            RouteError: No prompt, bad token ids, or text that cannot be tokenized.
        """
        keys = self.keys(request)
        candidates, unknown = self._candidates(request)
        num_store = await self._store_blocks(keys) if candidates else 0
        masks = self.index.masks(keys)
        ranked = score_pods(
            masks,
            self.index.num_slots,
            num_store,
            candidates,
            self.weights,
            request.top_k,
        )
        return RouteResult(
            request.model,
            len(keys),
            self.config.block_tokens,
            num_store,
            ranked,
            unknown,
        )

    def keys(self, request: RouteRequest) -> KeyChain:
        """The prompt's kvtier keys, in the namespace its engines key it in."""
        token_ids = request.token_ids
        if token_ids is None:
            token_ids = self._tokenize(request)
        namespace = self.namespace(request.model, request.lora, request.cache_salt)
        try:
            return block_keys(namespace, token_ids)
        except KeyFormatError as exc:
            raise RouteError(f"token_ids: {exc}") from exc

    def _tokenize(self, request: RouteRequest) -> list[int]:
        if request.text is None:
            raise RouteError("a route request needs token_ids or text")
        settings = self.config.models.get(request.model)
        name = request.tokenizer or (settings.tokenizer if settings else "")
        configured = {m.tokenizer for m in self.config.models.values()}
        if request.tokenizer and request.tokenizer not in configured:
            # A request may pick among the configured tokenizers, never name a path
            # on this machine: that would let any caller make the router open (and
            # keep in memory) files of its choosing, and tell which ones exist.
            raise RouteError(
                f"tokenizer {request.tokenizer!r} is not configured: a request may "
                "name only a router.models.<model>.tokenizer"
            )
        if not name:
            raise RouteError(
                f"text needs a tokenizer: pass 'tokenizer', or set "
                f"router.models.{request.model}.tokenizer"
            )
        return load_tokenizer(name)(request.text)

    def _candidates(
        self, request: RouteRequest
    ) -> tuple[list[Candidate], tuple[str, ...]]:
        wanted: Sequence[str] = (
            request.pods if request.pods is not None else list(self.pods)
        )
        found = [self.pods[p] for p in wanted if p in self.pods]
        unknown = tuple(p for p in wanted if p not in self.pods)
        return [
            Candidate(pod.pod_id, pod.slot, pod.load)
            for pod in found
            if pod.config.model == request.model
        ], unknown

    async def _store_blocks(self, keys: KeyChain) -> int:
        if self.store is None or not self.config.store_weight or not keys:
            return 0
        try:
            return await asyncio.wait_for(
                self.store.match(keys), self.config.store_timeout_seconds
            )
        except (TimeoutError, KVTierError) as exc:
            self.store_errors += 1
            log.warning("shared store did not answer a match: %r", exc)
            return 0
