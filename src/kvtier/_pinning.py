"""How an arena's pages are held: transparent huge pages asked for on every mapping,
and page-locking for CUDA, so host<->GPU copies of its blocks can be asynchronous.
Shared by the memory tier, the node client (the node's arena, mapped) and the engine
integrations (an embedded store's arena). torch loads only when asked for."""

from __future__ import annotations

import contextlib
import logging
import mmap
import sys
from typing import Any

import numpy as np

from kvtier.errors import ConfigError

__all__ = ["advise_huge_pages", "pin_for_cuda", "unpin"]

log = logging.getLogger(__name__)


def advise_huge_pages(mapping: mmap.mmap) -> None:
    """Asks for transparent huge pages on ``mapping`` (``MADV_HUGEPAGE``).

    A 2 MiB page is one fault and one TLB entry where 4 KiB pages are 512 of each: a
    copy through a huge-page arena runs about 10% faster. Each process asks for its
    own mapping of a shared arena. A shared (memfd) arena gets them only where the
    kernel's ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` allows it
    (``advise`` or ``always``; many distributions ship ``never``). Where THP is off
    this does nothing: the arena is only slower.
    """
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mapping.madvise(mmap.MADV_HUGEPAGE)


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
