"""Small transformer models built from a config with random weights (no download).

The demo, ``kvtier bench ttft``, the GPU benchmark and the tests use these: what they
measure and check (KV round trips, logits, TTFT) depends on the shape of a model,
not on trained weights. Weights are seeded, so a shape and a seed give the same model,
and so the same KV, in every process: blocks stored by one run are valid in the next.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["SHAPES", "ModelShape", "build_model"]

ModelKind = Literal["llama", "qwen2"]


@dataclass(frozen=True)
class ModelShape:
    """A decoder's dimensions (transformers config names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int


SHAPES: dict[str, ModelShape] = {
    # tests: a few milliseconds per forward pass
    "tiny": ModelShape(64, 128, 2, 4, 2, 1000, 512),
    # the demo and `kvtier bench ttft` on a CPU: prefill of a few thousand tokens
    # takes long enough to measure, a full hit does not
    "small": ModelShape(256, 768, 4, 8, 2, 4096, 16384),
    # Llama-3-8B: 32 layers, 8 KV heads of 128 -> 128 KiB of bf16 KV per token
    "llama3-8b": ModelShape(4096, 14336, 32, 32, 8, 128256, 131072),
}


def build_model(
    kind: ModelKind,
    shape: str | ModelShape,
    *,
    seed: int = 0,
    dtype: Any = None,
    device: Any = "cpu",
) -> Any:
    """A causal LM of ``shape`` with seeded random weights, in eval mode.

    Args:
        kind: ``"llama"`` or ``"qwen2"``.
        shape: A name from :data:`SHAPES` or a :class:`ModelShape`.
        seed: Seeds the weights.
        dtype: torch dtype (default float32).
        device: Where to build it (weights are made there, not copied).
    """
    import torch
    import transformers

    dims = SHAPES[shape] if isinstance(shape, str) else shape
    prefix = {"llama": "Llama", "qwen2": "Qwen2"}[kind]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    config = config_cls(**asdict(dims), attn_implementation="sdpa")
    config.name_or_path = f"kvtier-random-{kind}-{_shape_name(dims)}-seed{seed}"
    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights made in dtype: no float32 copy first
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _shape_name(dims: ModelShape) -> str:
    for name, known in SHAPES.items():
        if known == dims:
            return name
    return f"h{dims.hidden_size}l{dims.num_hidden_layers}kv{dims.num_key_value_heads}"
