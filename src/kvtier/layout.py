"""KV layouts, blocks as bytes without copies, checksums and compression codecs.

A block is the KV cache of ``block_tokens`` tokens across every layer, in one canonical
shape, ``(num_layers, kv_parts, block_tokens, num_kv_heads, head_dim)``: ``kv_parts`` is
2 (K then V) for ordinary attention and 1 for MLA's latent cache. Engines gather into
and scatter out of that shape (``kvtier.integrations``); the store only sees bytes.

Blocks come in and go out as numpy arrays, torch tensors or bytes-like objects through
the buffer protocol: validating a block never copies it, and the only copy on a put or a
get is the one into or out of the tier. numpy has no bfloat16 or float8, so those are
carried as same-width unsigned ints (``uint16`` / ``uint8``); :func:`to_torch` views
them back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import xxhash

from kvtier.errors import ConfigError, CorruptBlockError, LayoutError

__all__ = [
    "CODECS",
    "Codec",
    "DTypeName",
    "KVLayout",
    "as_block_array",
    "block_arrays",
    "checksum",
    "copy_block",
    "codec_by_id",
    "get_codec",
    "to_torch",
    "writable_bytes",
]

DTypeName = Literal[
    "float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2", "int8", "uint8"
]

# dtype name -> (numpy storage dtype, torch dtype attribute name)
_DTYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "float16": (np.dtype(np.float16), "float16"),
    "bfloat16": (np.dtype(np.uint16), "bfloat16"),
    "float32": (np.dtype(np.float32), "float32"),
    "float8_e4m3fn": (np.dtype(np.uint8), "float8_e4m3fn"),
    "float8_e5m2": (np.dtype(np.uint8), "float8_e5m2"),
    "int8": (np.dtype(np.int8), "int8"),
    "uint8": (np.dtype(np.uint8), "uint8"),
}
# Raw same-width views torch can hand to numpy for the dtypes numpy lacks.
_TORCH_RAW_VIEW = {
    "bfloat16": "int16",
    "float8_e4m3fn": "uint8",
    "float8_e5m2": "uint8",
}


@dataclass(frozen=True)
class KVLayout:
    """The shape of one block of KV cache.

    Attributes:
        num_layers: Attention layers whose KV the block holds.
        num_kv_heads: KV heads per layer on this tensor-parallel rank.
        head_dim: Size of one head (for MLA, the latent size).
        dtype: Element type of the cache.
        block_tokens: Tokens per block.
        kv_parts: 2 for separate K and V, 1 for MLA's single latent.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DTypeName = "bfloat16"
    block_tokens: int = 256
    kv_parts: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"layout.{name} must be a positive int, got {value!r}"
                )
        if self.kv_parts not in (1, 2):
            raise ConfigError(f"layout.kv_parts must be 1 or 2, got {self.kv_parts!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(
                f"layout.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``(num_layers, kv_parts, block_tokens, num_kv_heads, head_dim)``."""
        return (
            self.num_layers,
            self.kv_parts,
            self.block_tokens,
            self.num_kv_heads,
            self.head_dim,
        )

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype blocks are carried in (same width as ``dtype``)."""
        return _DTYPES[self.dtype][0]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block."""
        return math.prod(self.block_shape) * self.numpy_dtype.itemsize

    @property
    def layout_id(self) -> str:
        """A stable fingerprint that seeds block keys (see ``Namespace.layout_id``)."""
        layers, parts, tokens, heads, dim = self.block_shape
        return f"L{layers}P{parts}T{tokens}H{heads}D{dim}:{self.dtype}"

    def block_array(self, block: Any) -> np.ndarray[Any, Any]:
        """``block`` as a numpy array of ``block_shape``, validated, without a copy.

        Accepts a numpy array or a CPU torch tensor of exactly ``block_shape`` and
        ``dtype`` (any strides), or a bytes-like object of exactly ``block_bytes``.
        A GPU tensor is copied to the host once.

        Raises:
            LayoutError: The dtype, shape or byte size does not match.
        """
        arr = as_block_array(block, self.dtype)
        if arr.ndim == 1 and arr.dtype == np.uint8 and arr.shape != self.block_shape:
            return self._raw_block(arr)
        if arr.dtype != self.numpy_dtype:
            raise LayoutError(
                f"block dtype must be {self.dtype} (numpy {self.numpy_dtype}), "
                f"got {arr.dtype}"
            )
        if arr.shape != self.block_shape:
            raise LayoutError(
                f"block must have shape {self.block_shape} ({self.block_bytes} bytes), "
                f"got shape {arr.shape} ({arr.nbytes} bytes)"
            )
        return arr

    def _raw_block(self, arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if arr.nbytes != self.block_bytes:
            raise LayoutError(
                f"a raw block must be {self.block_bytes} bytes "
                f"({self.block_shape} of {self.dtype}), got {arr.nbytes} bytes"
            )
        if not arr.flags.c_contiguous:
            raise LayoutError("a raw block must be one contiguous buffer")
        return arr.view(self.numpy_dtype).reshape(self.block_shape)

    def view(self, buffer: Any) -> np.ndarray[Any, Any]:
        """A writable ``block_shape`` array over a ``block_bytes`` buffer (no copy)."""
        arr = np.frombuffer(buffer, dtype=self.numpy_dtype)
        if arr.nbytes != self.block_bytes:
            raise LayoutError(
                f"buffer must hold {self.block_bytes} bytes, got {arr.nbytes}"
            )
        return arr.reshape(self.block_shape)


def block_arrays(
    keys: Sequence[Any], blocks: Sequence[Any], layout: KVLayout | None
) -> list[np.ndarray[Any, Any]]:
    """The blocks of a put as numpy arrays (checked against ``layout`` when given).

    Raises:
        LayoutError: Keys and blocks differ in number, or a block is not block-like
            (or does not match ``layout``).
    """
    if len(keys) != len(blocks):
        raise LayoutError(f"got {len(keys)} keys but {len(blocks)} blocks")
    if layout is not None:
        return [layout.block_array(b) for b in blocks]
    return [as_block_array(b) for b in blocks]


def as_block_array(block: Any, dtype_name: str | None = None) -> np.ndarray[Any, Any]:
    """Any block-like object as a numpy array sharing its memory.

    Bytes-like objects become flat ``uint8`` arrays. Torch tensors of dtypes numpy lacks
    become same-width unsigned views. ``dtype_name`` is the layout's dtype, used only to
    name the expectation in errors.

    Raises:
        LayoutError: The object is not an array, tensor or buffer.
    """
    if isinstance(block, np.ndarray):
        return block
    if _is_torch_tensor(block):
        return _torch_to_numpy(block, dtype_name)
    try:
        return np.frombuffer(block, dtype=np.uint8)
    except TypeError as exc:
        raise LayoutError(
            "a block must be a numpy array, a torch tensor or a bytes-like object, "
            f"got {type(block).__name__}"
        ) from exc


def copy_block(dst: np.ndarray[Any, Any], src: np.ndarray[Any, Any]) -> None:
    """Copies a block into a flat ``uint8`` destination, straight from its strides."""
    if src.flags.c_contiguous:
        np.copyto(dst, src.reshape(-1).view(np.uint8))
    else:
        np.copyto(dst.view(src.dtype).reshape(src.shape), src)


def writable_bytes(out: Any, layout: KVLayout | None = None) -> np.ndarray[Any, Any]:
    """An output buffer as a flat writable ``uint8`` array sharing its memory.

    Raises:
        LayoutError: It does not match ``layout``, or is read-only or strided.
    """
    arr = layout.block_array(out) if layout is not None else as_block_array(out)
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise LayoutError("output buffers must be C-contiguous and writable")
    return arr.reshape(-1).view(np.uint8)


def to_torch(array: np.ndarray[Any, Any], dtype_name: DTypeName) -> Any:
    """A torch tensor sharing ``array``'s memory, in the layout's real dtype."""
    import torch

    tensor = torch.from_numpy(array)
    raw = _TORCH_RAW_VIEW.get(dtype_name)
    if raw is not None:
        tensor = tensor.view(getattr(torch, raw)).view(getattr(torch, dtype_name))
    return tensor


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr")


def _torch_to_numpy(tensor: Any, dtype_name: str | None) -> np.ndarray[Any, Any]:
    import torch

    torch_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name is not None and torch_name != _DTYPES[dtype_name][1]:
        raise LayoutError(f"block dtype must be {dtype_name}, got torch.{torch_name}")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    raw = _TORCH_RAW_VIEW.get(torch_name)
    if raw is not None:
        tensor = tensor.view(getattr(torch, raw))
    arr = tensor.numpy()
    if torch_name == "bfloat16":
        arr = arr.view(np.uint16)
    elif torch_name in ("float8_e4m3fn", "float8_e5m2"):
        arr = arr.view(np.uint8)
    return np.asarray(arr)


def checksum(data: Any) -> int:
    """The 64-bit checksum (xxh3-64) that guards every block stored outside memory."""
    return xxhash.xxh3_64_intdigest(data)


CodecName = Literal["none", "lz4", "zstd"]
CODECS: tuple[str, ...] = get_args(CodecName)


@dataclass(frozen=True)
class Codec:
    """A compression codec; ``codec_id`` is what block headers record."""

    name: str
    codec_id: int
    compress: Callable[[Any], bytes]
    decompress: Callable[[Any, int], bytes]

    def decompress_into(self, data: Any, out: memoryview) -> None:
        """Decompresses ``data`` into ``out``, which must be exactly the raw size.

        Raises:
            CorruptBlockError: The data does not decompress to ``len(out)`` bytes.
        """
        try:
            raw = self.decompress(data, len(out))
        except Exception as exc:  # every codec has its own error types
            raise CorruptBlockError(f"{self.name} payload does not decompress") from exc
        if len(raw) != len(out):
            raise CorruptBlockError(
                f"{self.name} payload decompressed to {len(raw)} bytes, "
                f"expected {len(out)}"
            )
        out[:] = raw


@functools.cache
def get_codec(name: str) -> Codec:
    """The codec called ``name`` (see :data:`CODECS`).

    Raises:
        ConfigError: Unknown codec, or its package is not installed.
    """
    if name == "none":
        return Codec("none", 0, bytes, lambda data, size: bytes(data))
    if name == "lz4":
        try:
            import lz4.block
        except ImportError as exc:
            raise ConfigError(
                "compression 'lz4' needs the lz4 package: "
                "pip install 'kvtier[compression]'"
            ) from exc
        return Codec(
            "lz4",
            1,
            lambda data: lz4.block.compress(data, store_size=False),
            lambda data, size: lz4.block.decompress(data, uncompressed_size=size),
        )
    if name == "zstd":
        try:
            import zstandard
        except ImportError as exc:
            raise ConfigError(
                "compression 'zstd' needs the zstandard package: "
                "pip install 'kvtier[compression]'"
            ) from exc
        # The module-level functions are thread-safe; a shared ZstdCompressor is not.
        return Codec(
            "zstd",
            2,
            lambda data: zstandard.compress(data, 3),
            lambda data, size: zstandard.decompress(data, max_output_size=size),
        )
    raise ConfigError(f"compression must be one of {list(CODECS)}, got {name!r}")


def codec_by_id(codec_id: int) -> Codec:
    """The codec a block header names.

    Raises:
        CorruptBlockError: The id names no codec (or its package is missing here).
    """
    name = _CODEC_NAMES.get(codec_id)
    if name is None:
        raise CorruptBlockError(f"block header names unknown codec id {codec_id}")
    try:
        return get_codec(name)
    except ConfigError as exc:
        raise CorruptBlockError(f"block needs codec {name!r}: {exc}") from exc


_CODEC_NAMES = {0: "none", 1: "lz4", 2: "zstd"}
