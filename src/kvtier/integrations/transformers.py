"""Hugging Face transformers: a model's ``past_key_values`` saved and loaded by prefix.

::

    from kvtier.integrations.transformers import PrefixCache

    with PrefixCache(model) as kv:                       # embedded store (defaults)
        out = kv.generate(input_ids, max_new_tokens=32)   # loads, computes the rest,
                                                          # stores the new blocks

``save`` cuts a :class:`~transformers.DynamicCache` (per layer K and V of shape
``[batch, kv heads, tokens, head dim]``) into whole blocks of ``store.block_tokens``
tokens and stores the ones not stored yet; ``load`` rebuilds a ``DynamicCache`` from
the longest stored prefix. A load always leaves at least one token to compute: a model
needs one to produce the next token's logits, and transformers 4.57 fails on a cache
that covers the whole input. Keys are K after RoPE, as transformers keeps them, so a
prefix loads back at the positions it was computed at.

One sequence at a time (batch 1): prefixes are per sequence. Sliding-window layers are
refused, since they keep only their last window of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtier.core.keys import KeyChain, Namespace, block_keys
from kvtier.errors import LayoutError
from kvtier.integrations._torch import (
    Staging,
    blocks_from_heads,
    dtype_name,
    heads_from_blocks,
    load_blocks,
    save_blocks,
)
from kvtier.integrations.backend import (
    Blocks,
    ConfigSource,
    KVBackend,
    engine_config,
    open_backend,
)
from kvtier.layout import KVLayout

if TYPE_CHECKING:
    import torch

__all__ = ["Loaded", "PrefixCache", "PrefixStats", "model_layout"]


@dataclass
class Loaded:
    """What :meth:`PrefixCache.load` found.

    Attributes:
        cache: A ``DynamicCache`` of the first ``num_tokens`` tokens, or ``None``.
        num_tokens: Tokens the cache covers (0 on a miss).
    """

    cache: Any
    num_tokens: int


@dataclass
class PrefixStats:
    """Counters of one :class:`PrefixCache`: prompt tokens seen, loaded, stored."""

    prompt_tokens: int = 0
    loaded_tokens: int = 0
    stored_blocks: int = 0

    @property
    def hit_ratio(self) -> float:
        """Prompt tokens loaded from kvtier over prompt tokens seen."""
        return self.loaded_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def model_layout(model: Any, block_tokens: int) -> KVLayout:
    """The KV layout of a transformers model: its layers, KV heads, head dim, dtype."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVLayout(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        dtype=dtype_name(model.dtype),
        block_tokens=block_tokens,
    )


class PrefixCache:
    """Saves and loads one model's KV cache in kvtier, by token prefix.

    Args:
        model: A transformers causal LM (any device; CUDA copies are asynchronous
            through page-locked memory).
        backend: A ``TieredStore`` or ``Client``; ``None`` opens one from
            ``config`` (and closes it with this object).
        config: The configuration, a YAML file or a mapping of keys (see
            :func:`~kvtier.integrations.backend.engine_config`).
        model_id: Name of the model in block keys (default ``engine.model_id``,
            else the model's ``name_or_path``). Equal names must mean equal weights.

    Raises:
        LayoutError: The model's cache dtype cannot be stored.
        ConfigError: The configuration is not valid.
    """

    def __init__(
        self,
        model: Any,
        backend: KVBackend | None = None,
        *,
        config: ConfigSource = None,
        model_id: str | None = None,
    ) -> None:
        cfg = engine_config(config)
        self.model = model
        self.layout = model_layout(model, cfg.store.block_tokens)
        self.namespace = Namespace(
            model_id or cfg.engine.model_id or _model_name(model),
            layout_id=self.layout.layout_id,
            block_tokens=self.layout.block_tokens,
            tenant=cfg.engine.tenant,
        )
        cuda = model.device.type == "cuda"
        owned = backend is None
        self.blocks = Blocks(
            backend if backend is not None else open_backend(cfg),
            owned=owned,
            pin_for_cuda=cuda,
        )
        self.stats = PrefixStats()
        self._staging = Staging()

    def keys(self, token_ids: Any) -> KeyChain:
        """The block keys of every whole block of ``token_ids``."""
        return block_keys(self.namespace, _flat_ids(token_ids))

    def lookup(self, token_ids: Any) -> int:
        """Tokens of ``token_ids`` a load would cover now. No side effects."""
        ids = _flat_ids(token_ids)
        stored = self.blocks.match(self.keys(ids)) * self.layout.block_tokens
        return min(stored, max(0, len(ids) - 1))

    def load(self, token_ids: Any) -> Loaded:
        """The longest stored prefix of ``token_ids`` as a ``DynamicCache``.

        A block that vanished between the match and the read (evicted, corrupt)
        ends the prefix there: the rest is computed, never served as garbage.
        """
        ids = _flat_ids(token_ids)
        self.stats.prompt_tokens += len(ids)
        keys = self.keys(ids)
        num_blocks = self.blocks.match(keys)
        if num_blocks == 0 or len(ids) < 2:
            return Loaded(None, 0)
        data = load_blocks(
            self.blocks, list(keys[:num_blocks]), self.layout, self.model.device
        )
        if data.shape[0] == 0:
            return Loaded(None, 0)
        cache = self._dynamic_cache(heads_from_blocks(data))
        num_tokens = min(data.shape[0] * self.layout.block_tokens, len(ids) - 1)
        excess = cache.get_seq_length() - num_tokens
        if excess > 0:
            cache.crop(-excess)  # leave the last token to compute
        self.stats.loaded_tokens += num_tokens
        return Loaded(cache, num_tokens)

    def _dynamic_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer_id, (keys, values) in enumerate(layers):
            cache.update(keys, values, layer_id)
        return cache

    def save(self, token_ids: Any, past_key_values: Any) -> int:
        """Stores the whole blocks of ``past_key_values`` not stored yet.

        Args:
            token_ids: The tokens the cache was computed from (at least as many as
                it covers; extra tokens are ignored).
            past_key_values: A ``DynamicCache`` (or any cache with ``.layers`` of
                ``.keys`` / ``.values``) of one sequence.

        Returns:
            Blocks newly stored.

        Raises:
            LayoutError: The cache holds several sequences, or sliding-window layers.
        """
        layers = _cache_layers(past_key_values)
        covered = min(layers[0][0].shape[-2], len(_flat_ids(token_ids)))
        keys = self.keys(_flat_ids(token_ids)[:covered])
        start = self.blocks.match(keys)
        if start >= len(keys):
            return 0
        data = blocks_from_heads(layers, self.layout, start)[: len(keys) - start]
        stored = save_blocks(
            self.blocks, list(keys[start:]), data, self.layout, self._staging
        )
        self.stats.stored_blocks += stored
        return stored

    def finish(self, token_ids: Any) -> None:
        """Hints that the conversation ``token_ids`` is over (see
        ``TieredStore.finish``): the blocks no other prompt shares may go first when
        memory runs short. Pass the whole last sequence (prompt and answer)."""
        self.blocks.finish(self.keys(token_ids))

    def generate(self, input_ids: Any, **generate_kwargs: Any) -> Any:
        """``model.generate`` that prefills only what kvtier does not have.

        Loads the longest stored prefix of the prompt, lets transformers compute
        the rest and generate, then stores the new whole blocks (prompt and output:
        a follow-up prompt that contains this answer finds it too).

        Args:
            input_ids: ``[1, tokens]`` (or 1-D) token ids.
            generate_kwargs: Passed to ``model.generate`` (not ``past_key_values``).

        Returns:
            What ``model.generate`` returns.
        """
        from transformers import DynamicCache

        ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
        if ids.shape[0] != 1:
            raise LayoutError(
                f"generate takes one sequence, got a batch of {ids.shape[0]}"
            )
        loaded = self.load(ids[0])
        cache = loaded.cache or DynamicCache(config=self.model.config)
        output = self.model.generate(ids, past_key_values=cache, **generate_kwargs)
        sequences = output if hasattr(output, "dim") else output.sequences
        self.save(sequences[0], cache)
        return output

    def close(self) -> None:
        """Closes the backend when this object opened it."""
        self.blocks.close()

    def __enter__(self) -> PrefixCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _model_name(model: Any) -> str:
    return str(getattr(model.config, "name_or_path", "") or type(model).__name__)


def _flat_ids(token_ids: Any) -> Any:
    """Token ids of one sequence as a 1-D tensor, array or list."""
    shape = getattr(token_ids, "shape", None)
    if shape is not None and len(shape) == 2:
        if shape[0] != 1:
            raise LayoutError(f"expected one sequence, got a batch of {shape[0]}")
        return token_ids[0]
    return token_ids


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = []
    for layer_id, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            raise LayoutError(
                f"layer {layer_id} is a sliding-window layer, which keeps only its "
                "last window of tokens; kvtier stores whole prefixes"
            )
        if layer.keys.shape[0] != 1:
            raise LayoutError(
                f"expected the cache of one sequence, got a batch of "
                f"{layer.keys.shape[0]}"
            )
        layers.append((layer.keys, layer.values))
    return layers
