"""Serving one prompt with greedy decoding, timed: what the demo and benchmarks run.

:func:`serve` is the smallest honest engine loop: load the stored prefix (when a
:class:`~kvtier.integrations.transformers.PrefixCache` is given), prefill the rest,
take the first token (time to first token ends here), decode greedily, then store
the new whole blocks. With and without kvtier the very same code runs, so the two
timings differ only by what kvtier saves, and the tokens must come out the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtier.integrations.transformers import PrefixCache

if TYPE_CHECKING:
    import torch

__all__ = ["Served", "serve"]


@dataclass(frozen=True)
class Served:
    """One prompt served.

    Attributes:
        tokens: The generated token ids.
        ttft_s: Seconds from the request to its first token (load + prefill).
        load_s: Seconds of that spent loading the prefix from kvtier.
        cached_tokens: Prompt tokens loaded instead of computed.
    """

    tokens: list[int]
    ttft_s: float
    load_s: float
    cached_tokens: int


def serve(
    model: Any,
    input_ids: torch.Tensor,
    kv: PrefixCache | None,
    new_tokens: int,
    *,
    store: bool = True,
) -> Served:
    """Serves ``input_ids`` (``[1, tokens]``) and times its first token.

    Args:
        model: A transformers causal LM.
        input_ids: The prompt.
        kv: Where prefixes are loaded from and stored, or ``None`` (no cache).
        new_tokens: Tokens to generate (at least 1).
        store: Store the new blocks afterwards (when ``kv`` is given).
    """
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        start = time.perf_counter()
        loaded = kv.load(input_ids) if kv is not None else None
        load_s = time.perf_counter() - start
        cache = loaded.cache if loaded and loaded.cache is not None else None
        cached = loaded.num_tokens if loaded else 0
        cache = cache if cache is not None else DynamicCache(config=model.config)
        token = _next(model, input_ids[:, cached:], cache)
        _sync(input_ids)
        ttft_s = time.perf_counter() - start
        tokens = [int(token)]
        for _ in range(new_tokens - 1):
            token = _next(model, token.view(1, 1), cache)
            tokens.append(int(token))
        if kv is not None and store:
            kv.save(input_ids, cache)
    return Served(tokens, ttft_s, load_s, cached)


def _next(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    logits = model(ids, past_key_values=cache, use_cache=True).logits
    token: torch.Tensor = logits[0, -1].argmax()
    return token


def _sync(tensor: torch.Tensor) -> None:
    import torch

    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
