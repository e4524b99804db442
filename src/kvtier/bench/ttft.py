"""``kvtier bench ttft``: time to first token with a full kvtier hit vs no cache.

A small model (random weights, built from a config) on the CPU. For each prompt
length, the same serving loop (:func:`~kvtier.integrations.serving.serve`) runs with
no cache (prefill of the whole prompt) and with the prompt's KV stored in kvtier
(load every whole block, compute the last token only). Each figure is the median of
``repeats`` runs, taken alternately so both see the machine in the same state. The
store is an embedded one in a scratch directory, so nothing of a previous run helps.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtier.config import load_config

__all__ = ["TTFTBenchConfig", "run_ttft_bench"]


@dataclass(frozen=True)
class TTFTBenchConfig:
    """Prompt lengths and repeats of ``kvtier bench ttft`` (``--quick`` shrinks)."""

    prompt_tokens: tuple[int, ...] = (1024, 2048, 4096, 8192)
    repeats: int = 5
    shape: str = "small"
    block_tokens: int = 256
    threads: int = 1  # torch threads: one keeps timings steady on a shared CPU

    @classmethod
    def quick(cls) -> TTFTBenchConfig:
        return cls(prompt_tokens=(1024, 2048), repeats=3)


def run_ttft_bench(
    cfg: TTFTBenchConfig, progress: Callable[[str], None]
) -> dict[str, float]:
    """Every figure, keyed as ``--json`` prints them (``..._ms``, ``..._ratio``)."""
    import torch

    from kvtier.integrations.models import build_model
    from kvtier.integrations.transformers import PrefixCache

    torch.set_num_threads(cfg.threads)
    model = build_model("llama", cfg.shape)
    scratch = tempfile.mkdtemp(prefix="kvtier-bench-ttft-")
    config = load_config(
        overrides={
            "store.data_dir": scratch,
            "store.block_tokens": cfg.block_tokens,
            "memory.capacity_bytes": "2GiB",
        }
    )
    results: dict[str, float] = {}
    try:
        with PrefixCache(model, config=config) as kv:
            for tokens in cfg.prompt_tokens:
                progress(f"{tokens}-token prompt")
                ids = torch.randint(0, 4000, (1, tokens), generator=_seeded(tokens))
                results.update(_bench_one(model, kv, ids, cfg.repeats))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _bench_one(model: Any, kv: Any, ids: Any, repeats: int) -> dict[str, float]:
    from kvtier.integrations.serving import serve

    serve(model, ids, kv, 1)  # warm-up, and stores every whole block
    plain, hit, load = [], [], []
    for _ in range(repeats):
        plain.append(serve(model, ids, None, 1).ttft_s)
        served = serve(model, ids, kv, 1, store=False)
        assert served.cached_tokens == ids.shape[1] - 1, "a full hit was expected"
        hit.append(served.ttft_s)
        load.append(served.load_s)
    n = ids.shape[1]
    nocache_ms = 1e3 * statistics.median(plain)
    hit_ms = 1e3 * statistics.median(hit)
    return {
        f"ttft_nocache_{n}_ms": nocache_ms,
        f"ttft_hit_{n}_ms": hit_ms,
        f"load_{n}_ms": 1e3 * statistics.median(load),
        f"speedup_{n}_ratio": nocache_ms / hit_ms,
    }


def _seeded(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)
