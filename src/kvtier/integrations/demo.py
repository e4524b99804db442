"""``kvtier demo``: prompts that share prefixes, served without and with kvtier.

A small Llama-shaped model (random weights, built from a config: nothing is
downloaded) serves groups of prompts: each group shares a long prefix (a document,
a system prompt) and ends in its own question. Every prompt is served twice by the
same loop (:func:`~kvtier.integrations.serving.serve`): once computing everything,
once through kvtier, which loads what an earlier prompt stored. The demo prints both
times to first token, the hit ratio, and checks that the generated tokens agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtier.config import Config
from kvtier.integrations.models import ModelKind, build_model
from kvtier.integrations.serving import Served, serve
from kvtier.integrations.transformers import PrefixCache

__all__ = ["DemoConfig", "DemoRow", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo serves."""

    groups: int = 2
    prompts_per_group: int = 3
    prefix_tokens: int = 1024
    question_tokens: int = 32
    new_tokens: int = 8
    model: ModelKind = "llama"
    shape: str = "small"
    seed: int = 0
    # One torch thread on a CPU: on a shared machine, OpenMP threads that wait for
    # each other made the same forward pass swing from 25 ms to 700 ms.
    threads: int = 1


@dataclass(frozen=True)
class DemoRow:
    """One prompt: served without kvtier (``plain``) and with it (``cached``)."""

    prompt_tokens: int
    plain: Served
    cached: Served

    @property
    def same_tokens(self) -> bool:
        return self.plain.tokens == self.cached.tokens


def prompts(cfg: DemoConfig) -> list[Any]:
    """Groups of prompts: a shared prefix per group, then a question per prompt."""
    import torch

    generator = torch.Generator().manual_seed(cfg.seed + 1)

    def tokens(count: int) -> torch.Tensor:
        return torch.randint(0, 4000, (1, count), generator=generator)

    out = []
    for _ in range(cfg.groups):
        prefix = tokens(cfg.prefix_tokens)
        for _ in range(cfg.prompts_per_group):
            out.append(torch.cat([prefix, tokens(cfg.question_tokens)], dim=1))
    return out


def run_demo(cfg: DemoConfig, config: Config, backend: Any = None) -> list[DemoRow]:
    """Serves every prompt without and with kvtier; one row per prompt.

    Args:
        cfg: The prompts and model.
        config: kvtier's configuration (the embedded default, or a node through
            ``engine.server``).
        backend: A store or client to use instead of opening one.
    """
    import torch

    torch.set_num_threads(cfg.threads)
    model = build_model(cfg.model, cfg.shape, seed=cfg.seed)
    batch = prompts(cfg)
    serve(model, batch[0][:, :64], None, 1)  # warm-up: first calls pay set-up costs
    rows = []
    with PrefixCache(model, backend, config=config) as kv:
        for ids in batch:
            plain = serve(model, ids, None, cfg.new_tokens)
            cached = serve(model, ids, kv, cfg.new_tokens)
            rows.append(DemoRow(ids.shape[1], plain, cached))
    return rows


def summary(rows: list[DemoRow]) -> dict[str, float]:
    """Totals: mean TTFTs, speedup on hits, hit ratio, tokens identical."""
    hits = [r for r in rows if r.cached.cached_tokens]
    prompt_tokens = sum(r.prompt_tokens for r in rows)
    return {
        "ttft_nocache_mean_ms": 1e3 * _mean([r.plain.ttft_s for r in rows]),
        "ttft_kvtier_mean_ms": 1e3 * _mean([r.cached.ttft_s for r in rows]),
        "speedup_on_hits_ratio": _mean([r.plain.ttft_s for r in hits])
        / max(_mean([r.cached.ttft_s for r in hits]), 1e-9)
        if hits
        else 0.0,
        "hit_ratio": sum(r.cached.cached_tokens for r in rows) / prompt_tokens,
        "identical_ratio": sum(r.same_tokens for r in rows) / len(rows),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
