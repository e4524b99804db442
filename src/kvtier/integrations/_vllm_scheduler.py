"""The scheduler half of the vLLM connector: what to load and save, step by step.

Plain logic over vLLM's request and scheduler-output objects (read by attribute), with
no import of vLLM or torch, so it is tested without either.

Units: vLLM hashes prompts in engine blocks of ``block_size`` tokens
(``request.block_hashes``, one per full block, each chained over the whole prefix);
kvtier stores blocks of ``block_tokens``, a multiple. kvtier block ``k`` is keyed by
the engine hash of its last engine block, folded into kvtier's namespace by
``engine_keys`` (so tenants, ranks and layouts stay apart). Only prompt tokens are
saved, once their whole kvtier block has been computed; a block that kvtier already
had (matched at admission) is never saved again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtier.core.keys import KeyChain, Namespace, engine_keys
from kvtier.integrations.backend import Blocks

__all__ = ["SchedulerSide", "StoredBlocks", "Transfer", "TransferPlan"]


@dataclass(frozen=True)
class Transfer:
    """Blocks of one request to move between vLLM's pages and kvtier.

    Attributes:
        req_id: The request.
        hashes: Engine hash of each kvtier block from the prompt's start to
            ``end`` (keys chain from the start, so the worker needs them all).
        first: First kvtier block to move.
        block_ids: Engine block ids holding tokens ``[first, end)`` blocks.
        skip_tokens: Leading tokens of block ``first`` not to write (a load that
            starts inside a kvtier block, after vLLM's own prefix-cache hit).
        num_tokens: Tokens to write from there (a load may end inside a block:
            the last prompt token is always computed).
    """

    req_id: str
    hashes: tuple[bytes, ...]
    first: int
    block_ids: tuple[int, ...]
    skip_tokens: int
    num_tokens: int

    @property
    def end(self) -> int:
        return len(self.hashes)

    def keys(self, namespace: Namespace) -> KeyChain:
        """kvtier keys of blocks ``[first, end)``."""
        return engine_keys(namespace, self.hashes)[self.first :]


@dataclass
class TransferPlan:
    """One step's loads (before the forward pass) and saves (after it)."""

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass(frozen=True)
class StoredBlocks:
    """Engine blocks newly saved to kvtier: what a KV event reports."""

    req_id: str
    engine_hashes: tuple[bytes, ...]
    parent_hash: bytes | None
    token_ids: tuple[int, ...]


@dataclass
class _Request:
    request: Any
    stored_blocks: int  # leading kvtier blocks known stored (matched or saved)
    block_ids: list[int] = field(default_factory=list)
    load: tuple[int, int] | None = None  # tokens [start, end) to load


class SchedulerSide:
    """Decides loads and saves for vLLM's scheduler.

    Args:
        blocks: The store (match only: the scheduler never moves bytes).
        namespace: The keys' namespace (the scheduler's, tensor-parallel rank 0).
        block_tokens: kvtier tokens per block.
        engine_block_size: vLLM tokens per (hash) block; divides ``block_tokens``.
    """

    def __init__(
        self,
        blocks: Blocks,
        namespace: Namespace,
        block_tokens: int,
        engine_block_size: int,
    ) -> None:
        assert block_tokens % engine_block_size == 0, "checked by the connector"
        self.blocks = blocks
        self.namespace = namespace
        self.block_tokens = block_tokens
        self.engine_block_size = engine_block_size
        self._ratio = block_tokens // engine_block_size
        self._matched: dict[str, tuple[int, int]] = {}  # req -> (local, kvtier blocks)
        self._requests: dict[str, _Request] = {}
        self._stored: list[StoredBlocks] = []

    def block_hashes(self, request: Any, num_blocks: int | None = None) -> list[bytes]:
        """The engine hash ending each whole kvtier block of the prompt."""
        hashes = request.block_hashes
        usable = min(len(hashes), request.num_prompt_tokens // self.engine_block_size)
        count = usable // self._ratio
        if num_blocks is not None:
            count = min(count, num_blocks)
        return [bytes(hashes[(k + 1) * self._ratio - 1]) for k in range(count)]

    def num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Tokens kvtier can load past vLLM's own hit; never the last prompt token.

        Side-effect free on the store (vLLM may ask again); the answer is
        remembered for :meth:`after_alloc`.
        """
        hashes = self.block_hashes(request)
        stored = self.blocks.match(engine_keys(self.namespace, hashes)) if hashes else 0
        self._matched[request.request_id] = (num_computed_tokens, stored)
        # One token must stay to compute: its logits give the next token.
        loadable = min(stored * self.block_tokens, request.num_tokens - 1)
        loadable -= loadable % self.engine_block_size
        return max(0, loadable - num_computed_tokens), False

    def after_alloc(self, request: Any, num_external_tokens: int) -> None:
        """Records a request vLLM scheduled, and the load it agreed to."""
        local, stored = self._matched.pop(request.request_id, (0, 0))
        state = _Request(request, stored)
        if num_external_tokens > 0:
            state.load = (local, local + num_external_tokens)
        self._requests[request.request_id] = state

    def build(self, scheduler_output: Any) -> TransferPlan:
        """This step's plan; called once per step, after scheduling."""
        plan = TransferPlan()
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            done = new.num_computed_tokens + _scheduled(scheduler_output, new.req_id)
            self._plan(state, done, plan)
        cached = scheduler_output.scheduled_cached_reqs
        for position, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[position]
            if req_id in getattr(cached, "resumed_req_ids", ()):
                state.block_ids = []
            if new_ids is not None:
                state.block_ids.extend(new_ids[0])
            done = cached.num_computed_tokens[position] + _scheduled(
                scheduler_output, req_id
            )
            self._plan(state, done, plan)
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self._requests.pop(req_id, None)  # rescheduled from scratch later
        return plan

    def _plan(self, state: _Request, computed_tokens: int, plan: TransferPlan) -> None:
        if state.load is not None:
            plan.loads.append(self._load(state, *state.load))
            state.load = None
        end = min(computed_tokens, state.request.num_prompt_tokens) // self.block_tokens
        if end > state.stored_blocks:
            hashes = self.block_hashes(state.request, end)
            if len(hashes) > state.stored_blocks:
                plan.saves.append(self._transfer(state, hashes, state.stored_blocks))
                self._record_stored(state, state.stored_blocks, len(hashes))
                state.stored_blocks = len(hashes)

    def _load(self, state: _Request, start: int, stop: int) -> Transfer:
        first = start // self.block_tokens
        end = -(-stop // self.block_tokens)
        hashes = self.block_hashes(state.request, end)
        skip = start - first * self.block_tokens
        return self._transfer(state, hashes, first, skip, stop - start)

    def _transfer(
        self,
        state: _Request,
        hashes: list[bytes],
        first: int,
        skip: int = 0,
        num_tokens: int | None = None,
    ) -> Transfer:
        lo, hi = first * self._ratio, len(hashes) * self._ratio
        if num_tokens is None:
            num_tokens = (len(hashes) - first) * self.block_tokens
        return Transfer(
            state.request.request_id,
            tuple(hashes),
            first,
            tuple(state.block_ids[lo:hi]),
            skip,
            num_tokens,
        )

    def _record_stored(self, state: _Request, first: int, end: int) -> None:
        request = state.request
        lo, hi = first * self._ratio, end * self._ratio
        parent = bytes(request.block_hashes[lo - 1]) if lo > 0 else None
        size = self.engine_block_size
        tokens = request.all_token_ids[lo * size : hi * size]
        self._stored.append(
            StoredBlocks(
                request.request_id,
                tuple(bytes(h) for h in request.block_hashes[lo:hi]),
                parent,
                tuple(tokens),
            )
        )

    def finished(self, req_id: str, conversation_over: bool = False) -> None:
        """Forgets a request (saves are synchronous: nothing to wait for). When its
        conversation is over, tells the store its prompt is finished, so that the
        blocks only it holds go first (``TieredStore.finish``)."""
        tracked = self._requests.pop(req_id, None)
        self._matched.pop(req_id, None)
        if conversation_over and tracked is not None:
            hashes = self.block_hashes(tracked.request)
            if hashes:
                self.blocks.finish(engine_keys(self.namespace, hashes))

    def take_stored(self) -> list[StoredBlocks]:
        """Blocks saved since the last call (for KV events)."""
        stored, self._stored = self._stored, []
        return stored


def _scheduled(scheduler_output: Any, req_id: str) -> int:
    counts: dict[str, int] = scheduler_output.num_scheduled_tokens
    return int(counts.get(req_id, 0))
