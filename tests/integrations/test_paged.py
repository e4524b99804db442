"""Paged KV caches of every engine layout <-> kvtier blocks, bit-exact."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.errors import LayoutError
from kvtier.integrations.paged import PagedKV, detect_format

torch = pytest.importorskip("torch")

LAYERS, PAGES, PAGE, HEADS, DIM = 3, 12, 16, 2, 8
# vLLM 0.33's physical orders of the logical [L, B, H, N, C] cache
ORDERS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}


def random_bits(shape: tuple[int, ...], dtype: Any) -> Any:
    """Random bytes viewed as ``dtype``: every bit pattern, NaNs included."""
    raw = torch.randint(-128, 128, (*shape[:-1], shape[-1] * 2), dtype=torch.int8)
    return raw.view(dtype)


def packed_layers(order: tuple[int, ...], dtype: Any) -> list[Any]:
    """[B, H, N, 2D] per layer as non-contiguous views of one buffer."""
    logical = (LAYERS, PAGES, HEADS, PAGE, 2 * DIM)
    physical = random_bits(tuple(logical[axis] for axis in order), dtype)
    cache = physical.permute(*[order.index(axis) for axis in range(5)])
    return [cache[layer] for layer in range(LAYERS)]


def layers_of(fmt: str, dtype: Any, page: int = PAGE) -> list[Any]:
    shapes = {
        "kv_first": (2, PAGES, page, HEADS, DIM),
        "page_first": (PAGES, 2, page, HEADS, DIM),
        "mla": (PAGES, 1, page, DIM),
        "mla_3d": (PAGES, page, DIM),
    }
    return [random_bits(shapes[fmt], dtype) for _ in range(LAYERS)]


def round_trip(source: list[Any], **geometry: Any) -> None:
    paged = PagedKV(source, **geometry)
    slots = paged.slots([3, 1, 5, 0])  # two 32-token blocks on four pages
    blocks = paged.gather(slots, 32)
    assert blocks.shape == (2, *paged.block_layout(32).block_shape)
    target = [torch.zeros_like(layer) for layer in source]
    # zeros_like keeps strides of dense tensors only; give views their own buffer
    PagedKV(target, **geometry).scatter(blocks, slots)
    again = PagedKV(target, **geometry).gather(slots, 32)
    assert torch.equal(again.view(torch.int8), blocks.view(torch.int8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_vllm_033_packed_layouts_round_trip(order: str, dtype: str) -> None:
    source = packed_layers(ORDERS[order], getattr(torch, dtype))
    paged = PagedKV(source, num_kv_heads=HEADS, head_size=DIM, block_size=PAGE)
    assert paged.format == "heads_packed"
    blocks = paged.gather(paged.slots([5, 6]), 32)
    # K of token 3 of page 5, head 1, layer 2 is C[:D]; V is C[D:]
    assert torch.equal(
        blocks[0, 2, 0, 3, 1].view(torch.int16),
        source[2][5, 1, 3, :DIM].view(torch.int16),
    )
    assert torch.equal(
        blocks[0, 2, 1, 3, 1].view(torch.int16),
        source[2][5, 1, 3, DIM:].view(torch.int16),
    )
    target = packed_layers(ORDERS[order], getattr(torch, dtype))
    for layer in target:
        layer.zero_()
    PagedKV(target, num_kv_heads=HEADS, head_size=DIM, block_size=PAGE).scatter(
        blocks, paged.slots([1, 3])
    )
    for src, dst in zip(source, target, strict=True):
        assert torch.equal(src[[5, 6]].view(torch.int16), dst[[1, 3]].view(torch.int16))


@pytest.mark.parametrize("fmt", ["kv_first", "page_first"])
def test_five_dim_layouts_of_older_vllm_round_trip(fmt: str) -> None:
    geometry = {"num_kv_heads": HEADS, "head_size": DIM, "block_size": PAGE}
    round_trip(layers_of(fmt, torch.bfloat16), **geometry)
    assert PagedKV(layers_of(fmt, torch.float16), **geometry).format == fmt


@pytest.mark.parametrize("fmt", ["mla", "mla_3d"])
def test_mla_latent_layouts_round_trip(fmt: str) -> None:
    geometry = {"num_kv_heads": 1, "head_size": DIM, "block_size": PAGE, "kv_parts": 1}
    round_trip(layers_of(fmt, torch.bfloat16), **geometry)


def test_kernel_blocks_that_split_a_page_keep_the_engine_numbering() -> None:
    geometry = {"num_kv_heads": HEADS, "head_size": DIM, "block_size": PAGE}
    split = layers_of("page_first", torch.float16, page=PAGE // 2)
    paged = PagedKV(split, **geometry)
    assert paged.page_tokens == PAGE // 2
    blocks = paged.gather(paged.slots([3]), PAGE)
    # engine block 3 = kernel pages 6 and 7
    assert torch.equal(
        blocks[0, 0, :, PAGE // 2 :].view(torch.int16), split[0][7].view(torch.int16)
    )
    round_trip(split, **geometry)


def test_unknown_layouts_are_refused_with_what_would_fit() -> None:
    with pytest.raises(LayoutError, match=r"\(pages, 2, 16, 2, 8\)"):
        detect_format(
            (12, 16, 2 * HEADS * DIM),
            num_kv_heads=HEADS,
            head_size=DIM,
            block_size=PAGE,
        )
    with pytest.raises(LayoutError, match="fits formats"):
        detect_format(
            (2, 2, PAGE, HEADS, DIM), num_kv_heads=HEADS, head_size=DIM, block_size=PAGE
        )
    fmt, _ = detect_format(
        (2, 2, PAGE, HEADS, DIM),
        num_kv_heads=HEADS,
        head_size=DIM,
        block_size=PAGE,
        prefer=("kv_first",),
    )
    assert fmt == "kv_first"
    with pytest.raises(LayoutError, match="shape"):
        PagedKV(
            [
                torch.zeros(PAGES, 2, PAGE, HEADS, DIM),
                torch.zeros(PAGES, 2, PAGE, HEADS, DIM, dtype=torch.float16),
            ],
            num_kv_heads=HEADS,
            head_size=DIM,
            block_size=PAGE,
        )
