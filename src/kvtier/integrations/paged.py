"""Paged engine KV caches <-> kvtier blocks: layout detection, gather, scatter.

Engines keep KV in pages of ``block_size`` tokens, one tensor per attention layer, and
vLLM changed that tensor's shape across releases (``shared/reference/engines.md``):

=============  ======================================  ===============================
format         per-layer shape                          who hands it out
=============  ======================================  ===============================
kv_first       ``(2, pages, tokens, heads, head_dim)``  vLLM <= 0.20 (FlashAttention);
                                                        vLLM v0, the seed-000 API
page_first     ``(pages, 2, tokens, heads, head_dim)``  vLLM 0.24; FlashInfer <= 0.20
heads_packed   ``(pages, heads, tokens, 2*head_dim)``   vLLM 0.28 - 0.33, any physical
                                                        order (LBNHC, LBHNC, LHBNC, ...)
mla            ``(pages, 1, tokens, latent)``           vLLM 0.28 - 0.33, MLA models
mla_3d         ``(pages, tokens, latent)``              vLLM <= 0.24, MLA models
=============  ======================================  ===============================

Each is seen through one logical view of shape ``(pages, kv_parts, tokens, heads,
head_dim)`` that shares the engine's storage, whatever its strides (vLLM 0.33 hands out
non-contiguous views of one buffer per KV-cache group); gather and scatter index that
view by token slot (``slot = block_id * block_size + offset``), so the physical order
never matters. ``tokens`` may be smaller than the engine's ``block_size`` when kernel
blocks split a page; slots stay in the engine's numbering. A tensor that fits none of
the formats is refused with a :class:`~kvtier.LayoutError` that names what it got and
what would fit, rather than guessed at: a wrong guess would store garbage under good
keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kvtier.errors import LayoutError
from kvtier.integrations._torch import dtype_name
from kvtier.layout import KVLayout

if TYPE_CHECKING:
    import torch

__all__ = ["FORMATS", "PagedFormat", "PagedKV", "detect_format"]

PagedFormat = Literal["kv_first", "page_first", "heads_packed", "mla", "mla_3d"]
FORMATS: tuple[PagedFormat, ...] = (
    "kv_first",
    "page_first",
    "heads_packed",
    "mla",
    "mla_3d",
)


@dataclass(frozen=True)
class _Geometry:
    """What a per-layer tensor must hold: from the engine's attention spec."""

    num_kv_heads: int
    head_size: int
    block_size: int
    kv_parts: int


ShapeTest = Callable[[tuple[int, ...], int, int], bool]

# format -> (kv_parts, rank, axis of the page's tokens, test of the other axes
# given the shape, the KV heads and the head size)
_SHAPES: dict[PagedFormat, tuple[int, int, int, ShapeTest]] = {
    "kv_first": (2, 5, 2, lambda s, h, d: s[0] == 2 and s[3:] == (h, d)),
    "page_first": (2, 5, 2, lambda s, h, d: s[1] == 2 and s[3:] == (h, d)),
    "heads_packed": (2, 4, 2, lambda s, h, d: s[1] == h and s[3] == 2 * d),
    "mla": (1, 4, 2, lambda s, h, d: h == 1 and s[1] == 1 and s[3] == d),
    "mla_3d": (1, 3, 1, lambda s, h, d: h == 1 and s[2] == d),
}


def _fits(fmt: PagedFormat, shape: tuple[int, ...], geo: _Geometry) -> int | None:
    """Tokens per page if ``shape`` is ``fmt`` for ``geo``, else ``None``."""
    parts, rank, axis, others = _SHAPES[fmt]
    if parts != geo.kv_parts or len(shape) != rank:
        return None
    if not others(shape, geo.num_kv_heads, geo.head_size):
        return None
    tokens = shape[axis]
    return tokens if tokens > 0 and geo.block_size % tokens == 0 else None


def detect_format(
    shape: Sequence[int],
    *,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    kv_parts: int = 2,
    prefer: Sequence[PagedFormat] = (),
) -> tuple[PagedFormat, int]:
    """The format of a per-layer paged KV tensor, and its tokens per page.

    Args:
        shape: The tensor's shape.
        num_kv_heads: KV heads per layer on this rank (1 for MLA).
        head_size: Head size (MLA: the latent size).
        block_size: The engine's tokens per block (a page may hold a divisor of it).
        kv_parts: 2 for K and V, 1 for MLA's single latent.
        prefer: When a shape fits several formats (only possible with exactly two
            pages), the one to take, in order; the engine version knows.

    Raises:
        LayoutError: No format fits, or several do and ``prefer`` does not decide.
    """
    geo = _Geometry(num_kv_heads, head_size, block_size, kv_parts)
    found = {f: t for f in FORMATS if (t := _fits(f, tuple(shape), geo)) is not None}
    if not found:
        raise LayoutError(_unknown_message(tuple(shape), geo))
    if len(found) > 1:
        choice = next((f for f in prefer if f in found), None)
        if choice is None:
            raise LayoutError(
                f"KV cache shape {tuple(shape)} fits formats {sorted(found)}; "
                "say which with prefer="
            )
        return choice, found[choice]
    fmt = next(iter(found))
    return fmt, found[fmt]


def _unknown_message(shape: tuple[int, ...], geo: _Geometry) -> str:
    h, d, b = geo.num_kv_heads, geo.head_size, geo.block_size
    if geo.kv_parts == 1:
        expected = f"(pages, 1, {b}, {d}) or (pages, {b}, {d}) for MLA"
    else:
        expected = (
            f"(2, pages, {b}, {h}, {d}) [vLLM <= 0.20], "
            f"(pages, 2, {b}, {h}, {d}) [vLLM 0.24], "
            f"(pages, {h}, {b}, {2 * d}) [vLLM 0.28-0.33]"
        )
    return (
        f"unsupported KV cache layout: a layer's tensor has shape {shape}, but "
        f"with {h} KV heads of size {d} and {b}-token blocks kvtier expects one of "
        f"{expected} (a divisor of {b} tokens per page is fine)"
    )


def _logical_view(tensor: torch.Tensor, fmt: PagedFormat) -> torch.Tensor:
    """``(pages, kv_parts, tokens, heads, head_dim)`` over the same storage."""
    views: dict[PagedFormat, Callable[[torch.Tensor], torch.Tensor]] = {
        "kv_first": lambda t: t.transpose(0, 1),
        "page_first": lambda t: t,
        "heads_packed": lambda t: t.view(*t.shape[:-1], 2, t.shape[-1] // 2).permute(
            0, 3, 2, 1, 4
        ),
        "mla": lambda t: t.permute(0, 2, 1, 3).unsqueeze(1),
        "mla_3d": lambda t: t.unsqueeze(1).unsqueeze(3),
    }
    try:
        return views[fmt](tensor)
    except RuntimeError as exc:  # e.g. a packed last axis that is not contiguous
        raise LayoutError(
            f"cannot view a {fmt} KV tensor of shape {tuple(tensor.shape)} and "
            f"strides {tensor.stride()} without copying: {exc}"
        ) from exc


class PagedKV:
    """An engine's paged KV cache (one tensor per layer) as kvtier sees it.

    Args:
        layers: The per-layer tensors, in layer order, all of one format.
        num_kv_heads / head_size / block_size / kv_parts: As for
            :func:`detect_format`.
        prefer: Formats to take when a shape is ambiguous.

    Raises:
        LayoutError: A layer fits no format, or layers differ.
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        *,
        num_kv_heads: int,
        head_size: int,
        block_size: int,
        kv_parts: int = 2,
        prefer: Sequence[PagedFormat] = (),
    ) -> None:
        if not layers:
            raise LayoutError("a paged KV cache needs at least one layer")
        first = layers[0]
        self.format, self.page_tokens = detect_format(
            first.shape,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            block_size=block_size,
            kv_parts=kv_parts,
            prefer=prefer,
        )
        for layer_id, layer in enumerate(layers):
            if layer.shape != first.shape or layer.dtype != first.dtype:
                raise LayoutError(
                    f"layer {layer_id} has shape {tuple(layer.shape)} {layer.dtype}, "
                    f"layer 0 {tuple(first.shape)} {first.dtype}"
                )
        self.views = [_logical_view(layer, self.format) for layer in layers]
        self.dtype = dtype_name(first.dtype)
        self.device = first.device
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.block_size = block_size
        self.kv_parts = kv_parts

    @property
    def num_layers(self) -> int:
        return len(self.views)

    def block_layout(self, block_tokens: int) -> KVLayout:
        """The kvtier layout of blocks of ``block_tokens`` tokens of this cache."""
        return KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            dtype=self.dtype,
            block_tokens=block_tokens,
            kv_parts=self.kv_parts,
        )

    def slots(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Token slots of whole engine blocks, in order."""
        import torch

        ids = torch.as_tensor(list(block_ids), dtype=torch.int64, device=self.device)
        offsets = torch.arange(self.block_size, dtype=torch.int64, device=self.device)
        return (ids[:, None] * self.block_size + offsets).reshape(-1)

    def _page_index(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        slots = slots.to(device=self.device, dtype=torch.int64)
        return slots // self.page_tokens, slots % self.page_tokens

    def gather(self, slots: torch.Tensor, block_tokens: int) -> torch.Tensor:
        """The KV of ``slots`` (a multiple of ``block_tokens`` token slots) as
        blocks: ``(n, layers, kv_parts, block_tokens, heads, head_dim)``."""
        import torch

        if slots.numel() % block_tokens:
            raise LayoutError(
                f"gather needs whole blocks of {block_tokens} slots, "
                f"got {slots.numel()}"
            )
        count = slots.numel() // block_tokens
        page, offset = self._page_index(slots)
        out = torch.empty(
            (count, *self.block_layout(block_tokens).block_shape),
            dtype=self.views[0].dtype,
            device=self.device,
        )
        for layer_id, view in enumerate(self.views):
            tokens = view[page, :, offset]  # slots, kv_parts, heads, head_dim
            out[:, layer_id] = tokens.view(
                count, block_tokens, *tokens.shape[1:]
            ).transpose(1, 2)
        return out

    def scatter(
        self, blocks: torch.Tensor, slots: torch.Tensor, first_token: int = 0
    ) -> None:
        """Writes tokens of ``blocks`` (as :meth:`gather` returns them) into
        ``slots``: token ``first_token + i`` of the run goes to ``slots[i]``."""
        page, offset = self._page_index(slots)
        last = first_token + slots.numel()
        for layer_id, view in enumerate(self.views):
            tokens = blocks[:, layer_id].transpose(1, 2).flatten(0, 1)
            view[page, :, offset] = tokens[first_token:last].to(view.device)
