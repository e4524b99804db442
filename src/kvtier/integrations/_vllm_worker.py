"""The worker half of the vLLM connector: moves blocks between pages and kvtier.

Loads run before the forward pass (vLLM calls ``start_load_kv`` first when a step has
synchronous loads, and kvtier's are synchronous: one DMA per block from the arena,
then a scatter on the GPU); saves run after it, in ``wait_for_save``, from the pages
the forward pass just filled. Both move every layer at once rather than layer by
layer: the per-layer hooks do not run under CUDA graphs, and one transfer of the whole
block is what the store holds anyway.

A load that comes up short (a block evicted or corrupt since the scheduler's match)
writes only what it read and reports the engine blocks it could not fill through
``get_block_ids_with_load_errors``; vLLM then recomputes them (with
``kv_load_failure_policy: recompute``) or fails the request, but never reads garbage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtier.core.keys import Namespace
from kvtier.errors import KVTierError
from kvtier.integrations._torch import Staging, load_blocks, save_blocks
from kvtier.integrations._vllm_scheduler import Transfer
from kvtier.integrations.backend import Blocks
from kvtier.integrations.paged import PagedKV

if TYPE_CHECKING:
    import torch

__all__ = ["WorkerSide"]

log = logging.getLogger(__name__)


class WorkerSide:
    """One vLLM worker's transfers.

    Args:
        blocks: The store.
        namespace: Keys' namespace, with this worker's tensor-parallel rank.
        block_tokens: kvtier tokens per block.
        paged: The worker's KV cache pages.
    """

    def __init__(
        self, blocks: Blocks, namespace: Namespace, block_tokens: int, paged: PagedKV
    ) -> None:
        self.blocks = blocks
        self.namespace = namespace
        self.block_tokens = block_tokens
        self.paged = paged
        self.layout = paged.block_layout(block_tokens)
        self._staging = Staging()
        self._load_errors: set[int] = set()

    def load(self, transfers: Sequence[Transfer]) -> None:
        """Fills the pages of each transfer from kvtier (before the forward pass)."""
        for transfer in transfers:
            try:
                written = self._load_one(transfer)
            except KVTierError as exc:
                log.warning("kvtier load of %s failed: %s", transfer.req_id, exc)
                written = 0
            if written < transfer.num_tokens:
                self._load_errors.update(self._block_ids_from(transfer, written))

    def _load_one(self, transfer: Transfer) -> int:
        """Loads and scatters; returns how many of the asked tokens were written."""
        keys = transfer.keys(self.namespace)
        data = load_blocks(self.blocks, list(keys), self.layout, self.paged.device)
        readable = data.shape[0] * self.block_tokens - transfer.skip_tokens
        slots = self.paged.slots(transfer.block_ids)
        count = max(0, min(transfer.num_tokens, readable))
        count = min(count, slots.numel() - transfer.skip_tokens)
        if count > 0:
            first = transfer.skip_tokens
            self.paged.scatter(data, slots[first : first + count], first)
        return count

    def _block_ids_from(self, transfer: Transfer, written: int) -> set[int]:
        """Engine blocks holding tokens the transfer should have written but did not."""
        size = self.paged.block_size
        start = transfer.skip_tokens + written
        stop = transfer.skip_tokens + transfer.num_tokens
        return set(transfer.block_ids[start // size : -(-stop // size)])

    def save(self, transfers: Sequence[Transfer]) -> None:
        """Stores each transfer's blocks (after the forward pass filled them)."""
        for transfer in transfers:
            ratio = self.block_tokens // self.paged.block_size
            expected = (transfer.end - transfer.first) * ratio
            if len(transfer.block_ids) < expected:
                continue  # pages not all allocated: nothing whole to save
            try:
                self._save_one(transfer)
            except KVTierError as exc:
                log.warning("kvtier save of %s failed: %s", transfer.req_id, exc)

    def _save_one(self, transfer: Transfer) -> None:
        data = self.paged.gather(
            self.paged.slots(transfer.block_ids), self.block_tokens
        )
        keys = transfer.keys(self.namespace)
        save_blocks(self.blocks, list(keys), data, self.layout, self._staging)

    def take_load_errors(self) -> set[int]:
        """Engine blocks that failed to load since the last call."""
        errors, self._load_errors = self._load_errors, set()
        return errors


def layer_tensors(
    kv_caches: dict[str, torch.Tensor], layer_names: Sequence[str]
) -> list[torch.Tensor]:
    """The per-layer tensors in the KV-cache group's layer order."""
    return [kv_caches[name] for name in layer_names if name in kv_caches]
