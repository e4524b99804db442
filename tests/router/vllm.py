"""What a vLLM engine puts on the wire, made the way vLLM makes it.

The structs below restate vLLM's ``vllm/distributed/kv_events.py`` (field names, order,
defaults and msgspec options) for both encodings the router must read: the map form of
vLLM >= 0.24 (``tag=True``, no ``array_like``) and the older array form
(``array_like=True``). They are encoded with ``msgspec.msgpack.Encoder``, the encoder
vLLM's publisher uses, so the router is tested against vLLM's bytes rather than against
its own idea of them. Block hashes follow vLLM's default: sha256 over pickle of
``(parent, tokens, extra_keys)``, sent as the low 64 bits (``int``) or as raw bytes.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

Form = Literal["map", "array"]
NONE_HASH = hashlib.sha256(b"vllm-none-hash").digest()


class MapBatch(msgspec.Struct, omit_defaults=True, gc=False, array_like=True):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class MapBlockStored(MapEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class MapBlockRemoved(MapEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class MapAllBlocksCleared(MapEvent, tag="AllBlocksCleared"):
    pass


class ArrayBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]


class ArrayEvent(
    msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True
):
    pass


class ArrayBlockStored(ArrayEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class ArrayBlockRemoved(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class ArrayAllBlocksCleared(ArrayEvent, tag="AllBlocksCleared"):
    pass


_ENCODER = msgspec.msgpack.Encoder()


def engine_hashes(
    tokens: Sequence[int],
    block_size: int = 16,
    parent: bytes | None = None,
    extra: tuple[Any, ...] | None = None,
) -> list[bytes]:
    """vLLM's sha256 block hashes of every full block of ``tokens`` (raw bytes)."""
    hashes, prev = [], parent or NONE_HASH
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tuple(tokens[start : start + block_size])
        prev = hashlib.sha256(
            pickle.dumps((prev, block, extra), protocol=pickle.HIGHEST_PROTOCOL)
        ).digest()
        hashes.append(prev)
    return hashes


def as_int(engine_hash: bytes) -> int:
    """vLLM's default event form of a hash: its low 64 bits."""
    return int.from_bytes(engine_hash, "big") & (2**64 - 1)


def stored(
    hashes: Sequence[int | bytes],
    parent: int | bytes | None,
    token_ids: Sequence[int],
    *,
    block_size: int = 16,
    medium: str | None = "GPU",
    lora_name: str | None = None,
    extra_keys: list[tuple[Any, ...] | None] | None = None,
    form: Form = "map",
) -> Any:
    if form == "array":
        return ArrayBlockStored(
            list(hashes), parent, list(token_ids), block_size, None, medium
        )
    return MapBlockStored(
        list(hashes),
        parent,
        list(token_ids),
        block_size,
        None,
        medium,
        lora_name,
        extra_keys,
    )


def removed(
    hashes: Sequence[int | bytes], medium: str | None = "GPU", form: Form = "map"
) -> Any:
    if form == "array":
        return ArrayBlockRemoved(list(hashes), medium)
    return MapBlockRemoved(list(hashes), medium)


def cleared(form: Form = "map") -> Any:
    return ArrayAllBlocksCleared() if form == "array" else MapAllBlocksCleared()


def batch(events: Sequence[Any], ts: float = 1.0, form: Form = "map") -> bytes:
    """One EventBatch payload, as vLLM's publisher encodes it."""
    if form == "array":
        return _ENCODER.encode(ArrayBatch(ts, list(events)))
    return _ENCODER.encode(MapBatch(ts, list(events), 0))
