"""Torch plumbing the integrations share: dtypes, moving blocks, the HF tensor shape.

Blocks travel in kvtier's canonical shape ``(num_layers, kv_parts, block_tokens,
num_kv_heads, head_dim)``; a run of ``n`` of them on a device is one contiguous tensor
of shape ``(n, *block_shape)``, so the host side moves whole blocks with one copy each
and every rearrangement into an engine's own layout runs on the device (a GPU does it
at memory bandwidth, far above the host link).

On CUDA, loads copy from the store's page-locked arena straight to the GPU (DMA, no
staging copy); saves go GPU -> a page-locked staging buffer (asynchronous) -> store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from kvtier.core.keys import BlockKey
from kvtier.errors import LayoutError
from kvtier.integrations.backend import Array, Blocks
from kvtier.layout import DTypeName, KVLayout

if TYPE_CHECKING:
    import torch

__all__ = [
    "Staging",
    "blocks_from_heads",
    "dtype_name",
    "heads_from_blocks",
    "load_blocks",
    "save_blocks",
]

_DTYPE_NAMES: tuple[DTypeName, ...] = (
    "float16",
    "bfloat16",
    "float32",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "uint8",
)


def dtype_name(dtype: Any) -> DTypeName:
    """kvtier's name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``).

    Raises:
        LayoutError: kvtier cannot store tensors of that dtype.
    """
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise LayoutError(
            f"KV cache dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}"
        )
    return name


def torch_dtype(name: DTypeName) -> torch.dtype:
    import torch

    return cast("torch.dtype", getattr(torch, name))


def load_blocks(
    blocks: Blocks,
    keys: list[BlockKey],
    layout: KVLayout,
    device: torch.device,
) -> torch.Tensor:
    """Reads the leading stored blocks of ``keys`` onto ``device``.

    Returns:
        ``(n, *layout.block_shape)`` with ``n`` the blocks read (maybe fewer than
        asked: a block evicted since the match ends the run).
    """
    import torch

    out = torch.empty(
        (len(keys), *layout.block_shape),
        dtype=torch_dtype(layout.dtype),
        device=device,
    )
    flat = out.view(torch.uint8).reshape(len(keys), layout.block_bytes)
    cuda = device.type == "cuda"

    def sink(position: int, block: Array) -> None:
        flat[position].copy_(_host_tensor(block), non_blocking=cuda)

    def wait() -> None:
        if cuda:
            torch.cuda.current_stream(device).synchronize()

    num_read = blocks.read(keys, layout.block_bytes, sink, wait)
    return out[:num_read]


def _host_tensor(block: Array) -> torch.Tensor:
    """A torch view of a (possibly read-only) arena block.

    torch wants writable arrays; this alias is only ever read, so it is flagged
    writable rather than copied (the arena itself is writable memory).
    """
    import torch

    alias = block.view()
    if not alias.flags.writeable:
        alias.flags.writeable = True
    return torch.from_numpy(alias)


class Staging:
    """A reusable page-locked host buffer for device -> host copies (CUDA only)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def host_copy(self, blocks: torch.Tensor) -> torch.Tensor:
        """``blocks`` on the host; from CUDA through the page-locked buffer."""
        import torch

        if blocks.device.type != "cuda":
            return blocks.contiguous()
        nbytes = blocks.numel() * blocks.element_size()
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        host = self._buffer[:nbytes].view(blocks.dtype).view(blocks.shape)
        host.copy_(blocks, non_blocking=True)
        torch.cuda.current_stream(blocks.device).synchronize()
        return host


def save_blocks(
    blocks: Blocks,
    keys: list[BlockKey],
    data: torch.Tensor,
    layout: KVLayout,
    staging: Staging,
) -> int:
    """Stores ``data`` (``(n, *block_shape)`` on any device) under ``keys``."""
    if not keys:
        return 0
    host = staging.host_copy(data)
    return blocks.put(keys, list(host.unbind(0)), layout)


def blocks_from_heads(
    layers: list[tuple[torch.Tensor, torch.Tensor]], layout: KVLayout, start: int
) -> torch.Tensor:
    """Cuts ``[batch=1, heads, tokens, head_dim]`` K / V per layer into blocks.

    Args:
        layers: K and V of each layer (transformers' per-layer cache tensors).
        layout: The block layout; ``block_tokens`` sets the cut.
        start: Index of the first block to cut; every whole block after it is cut.

    Returns:
        ``(n, *layout.block_shape)`` on the tensors' device.
    """
    import torch

    num_tokens = layers[0][0].shape[-2]
    tokens = layout.block_tokens
    count = max(0, num_tokens // tokens - start)
    first, last = start * tokens, (start + count) * tokens
    out = torch.empty(
        (count, *layout.block_shape),
        dtype=layers[0][0].dtype,
        device=layers[0][0].device,
    )
    for layer_id, pair in enumerate(layers):
        for part, tensor in enumerate(pair):
            span = tensor[0, :, first:last]  # heads, count * tokens, head_dim
            heads, _, dim = span.shape
            out[:, layer_id, part] = span.reshape(heads, count, tokens, dim).permute(
                1, 2, 0, 3
            )
    return out


def heads_from_blocks(
    blocks: torch.Tensor,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of :func:`blocks_from_heads`: contiguous K / V per layer."""
    count, num_layers, _, tokens, heads, dim = blocks.shape
    layers = []
    for layer_id in range(num_layers):
        pair = tuple(
            blocks[:, layer_id, part]
            .permute(2, 0, 1, 3)
            .reshape(1, heads, count * tokens, dim)
            for part in (0, 1)
        )
        layers.append((pair[0], pair[1]))
    return layers
