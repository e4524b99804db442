"""KV layouts: sizes, zero-copy views, validation errors, torch dtypes, codecs."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.errors import ConfigError, CorruptBlockError, LayoutError
from kvtier.layout import KVLayout, as_block_array, checksum, get_codec, to_torch

LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4
)


def test_block_shape_and_bytes() -> None:
    assert LAYOUT.block_shape == (2, 2, 4, 2, 8)
    assert LAYOUT.block_bytes == 2 * 2 * 4 * 2 * 8 * 2
    mla = KVLayout(
        num_layers=3,
        num_kv_heads=1,
        head_dim=576,
        dtype="bfloat16",
        block_tokens=64,
        kv_parts=1,
    )
    assert mla.block_bytes == 3 * 64 * 576 * 2
    assert LAYOUT.layout_id != mla.layout_id


def test_block_array_shares_memory() -> None:
    block = np.zeros(LAYOUT.block_shape, dtype=np.float16)
    arr = LAYOUT.block_array(block)
    assert np.shares_memory(arr, block)
    raw = bytearray(LAYOUT.block_bytes)
    view = LAYOUT.block_array(raw)
    assert view.shape == LAYOUT.block_shape
    view[0, 0, 0, 0, 0] = 1.5
    assert raw != bytearray(LAYOUT.block_bytes)


def test_wrong_dtype_names_expected_and_got() -> None:
    with pytest.raises(LayoutError, match=r"float16.*got float32"):
        LAYOUT.block_array(np.zeros(LAYOUT.block_shape, dtype=np.float32))


def test_wrong_shape_names_expected_and_got() -> None:
    with pytest.raises(
        LayoutError, match=r"\(2, 2, 4, 2, 8\).*got shape \(2, 2, 4, 2, 4\)"
    ):
        LAYOUT.block_array(np.zeros((2, 2, 4, 2, 4), dtype=np.float16))
    with pytest.raises(
        LayoutError, match=r"shape \(2, 2, 4, 2, 8\).*got shape \(4, 2, 2, 2, 8\)"
    ):
        LAYOUT.block_array(np.zeros((4, 2, 2, 2, 8), dtype=np.float16))


def test_wrong_byte_size_names_expected_and_got() -> None:
    with pytest.raises(LayoutError, match=f"{LAYOUT.block_bytes} bytes.*got 511 bytes"):
        LAYOUT.block_array(b"\0" * (LAYOUT.block_bytes - 1))


def test_bad_layouts_and_non_buffers() -> None:
    with pytest.raises(ConfigError, match="layout.num_layers"):
        KVLayout(num_layers=0, num_kv_heads=1, head_dim=1)
    with pytest.raises(ConfigError, match="layout.dtype"):
        KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype="float64")  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match="bytes-like"):
        as_block_array(object())


def test_torch_bfloat16_round_trips_without_copies() -> None:
    torch = pytest.importorskip("torch")
    layout = KVLayout(
        num_layers=1, num_kv_heads=2, head_dim=4, dtype="bfloat16", block_tokens=2
    )
    tensor = torch.randn(layout.block_shape).to(torch.bfloat16)
    arr = layout.block_array(tensor)
    assert arr.dtype == np.uint16 and arr.ctypes.data == tensor.data_ptr()
    back = to_torch(arr, "bfloat16")
    assert back.dtype == torch.bfloat16 and torch.equal(back, tensor)
    with pytest.raises(LayoutError, match="bfloat16, got torch.float16"):
        layout.block_array(tensor.to(torch.float16))


@pytest.mark.parametrize("name", ["lz4", "zstd"])
def test_codecs_round_trip_and_detect_garbage(name: str) -> None:
    codec = get_codec(name)
    data = np.tile(np.arange(64, dtype=np.uint8), 64).tobytes()
    packed = codec.compress(data)
    assert len(packed) < len(data)
    out = bytearray(len(data))
    codec.decompress_into(packed, memoryview(out))
    assert bytes(out) == data
    with pytest.raises(CorruptBlockError):
        codec.decompress_into(b"\xff" * 20, memoryview(bytearray(len(data))))


def test_unknown_codec_and_checksum() -> None:
    with pytest.raises(ConfigError, match="compression must be one of"):
        get_codec("snappy")
    assert checksum(b"abc") == checksum(bytearray(b"abc")) != checksum(b"abd")
