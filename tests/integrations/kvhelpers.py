"""Helpers of the integration tests (a module: conftest files are not imported)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BLOCK_TOKENS = 16


def store_settings(data_dir: Path, **extra: Any) -> dict[str, Any]:
    """Overrides of a small embedded store under ``data_dir``."""
    return {
        "store.data_dir": str(data_dir),
        "store.block_tokens": BLOCK_TOKENS,
        "memory.capacity_bytes": "64MiB",
        "disk.capacity_bytes": "256MiB",
        **extra,
    }


def tiny_model(kind: str, seed: int = 0) -> Any:
    """A tiny random Llama or Qwen2 in fp32 (no download)."""
    from kvtier.integrations.models import build_model

    return build_model(kind, "tiny", seed=seed)  # type: ignore[arg-type]
