"""Page-locking a mapped arena for CUDA, so host<->GPU copies of its blocks can be
asynchronous. Shared by the node client (the node's arena, mapped) and the engine
integrations (an embedded store's arena). torch loads only when asked for."""

from __future__ import annotations

import logging
import sys
from typing import Any

import numpy as np

from kvtier.errors import ConfigError

__all__ = ["pin_for_cuda", "unpin"]

log = logging.getLogger(__name__)


def pin_for_cuda(arena: np.ndarray[Any, Any], wanted: bool | None) -> int | None:
    """Page-locks the mapped arena for CUDA; returns its address when pinned."""
    if wanted is False:
        return None
    # Auto mode looks only at a torch the program already imported: importing it
    # here would cost seconds to clients that never touch a GPU.
    torch = sys.modules.get("torch")
    if wanted and torch is None:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is None or not torch.cuda.is_available():
        if wanted:
            raise ConfigError("pin_memory=True needs torch with a CUDA device")
        return None
    pointer = int(arena.ctypes.data)
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(pointer, arena.nbytes, 0)
    if int(status) != 0:
        log.warning(
            "cudaHostRegister of the arena failed (%s): copies stay sync", status
        )
        return None
    return pointer


def unpin(pointer: int) -> None:
    import torch

    torch.cuda.cudart().cudaHostUnregister(pointer)  # type: ignore[no-untyped-call]
