"""vLLM's KV cache events, decoded from the msgpack payloads its publisher sends.

A vLLM engine started with ``--kv-events-config`` publishes every change to its
prefix cache as ZMQ multipart messages ``(topic, seq, payload)``: ``seq`` an 8-byte
big-endian counter per publisher, ``payload`` one msgpack-encoded ``EventBatch``::

    EventBatch  = [ts, events, data_parallel_rank]          (or a map of those names)
    BlockStored = {"type": "BlockStored", "block_hashes": [...], ...}   (vLLM >= 0.24)
                = ["BlockStored", block_hashes, parent_block_hash, ...] (older, arrays)

Both event forms and both batch forms are accepted, with block hashes as ints (vLLM's
default: the low 64 bits of the hash) or raw bytes. Fields vLLM omits because they
hold their default read as ``None``; fields a newer vLLM adds are ignored, and so are
event types this module does not know (they are counted in ``num_unknown``), so a vLLM
upgrade does not stop ingestion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvtier.errors import EventFormatError

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EngineHash",
    "Event",
    "EventBatch",
    "decode_batch",
]

EngineHash = int | bytes
"""An engine's block hash as its events carry it: opaque, compared for equality."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks the engine cached, in chain order (each one's parent is the last).

    Attributes:
        block_hashes: The engine's hash of each stored block.
        parent_block_hash: Hash of the block before the first one (None: the first
            block of a prompt).
        token_ids: The stored blocks' tokens, ``block_size`` per block, concatenated.
        block_size: Tokens per engine block (vLLM's default is 16).
        medium: Where the blocks live ("GPU", "CPU", ...; None means GPU).
        lora_name: The LoRA adapter of the prompt (or the deprecated ``lora_id`` as a
            string), None for the base model.
        extra_keys: Per block, what else went into its hash (LoRA, cache salt,
            multimodal inputs) or None.
        group_idx: KV cache group of hybrid models (None or 0: the main group).
    """

    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks the engine evicted from ``medium``."""

    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache (a reset, a weight update)."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published message: its events in the order the engine produced them."""

    ts: float
    events: list[Event] = field(default_factory=list)
    data_parallel_rank: int | None = None
    num_unknown: int = 0


# Field order of the array (``array_like``) encoding, vLLM's struct field order.
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_BATCH_FIELDS = ("ts", "events", "data_parallel_rank")


def decode_batch(payload: bytes) -> EventBatch:
    """Decodes one msgpack ``EventBatch`` payload.

    Raises:
        EventFormatError: The payload is not msgpack, or not shaped like a batch of
            vLLM KV events.
    """
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EventFormatError(f"event batch is not valid msgpack: {exc}") from exc
    fields = _fields(raw, _BATCH_FIELDS, "event batch")
    ts, events = fields.get("ts"), fields.get("events")
    if not isinstance(ts, int | float) or not isinstance(events, list):
        raise EventFormatError(
            f"event batch needs [ts, events, ...], got {type(raw).__name__} {raw!r:.80}"
        )
    decoded: list[Event] = []
    for item in events:
        event = _event(item)
        if event is not None:
            decoded.append(event)
    rank = fields.get("data_parallel_rank")
    return EventBatch(
        float(ts),
        decoded,
        rank if isinstance(rank, int) else None,
        len(events) - len(decoded),
    )


def _fields(raw: Any, names: tuple[str, ...], what: str) -> dict[str, Any]:
    """A struct's fields from either encoding: a map, or an array in field order."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, list):
        return dict(zip(names, raw, strict=False))
    raise EventFormatError(f"{what} must be a map or an array, got {raw!r:.80}")


def _event(item: Any) -> Event | None:
    body: dict[str, Any] | list[Any]
    if isinstance(item, dict):
        tag, body = item.get("type"), item
    elif isinstance(item, list) and item:
        tag, body = item[0], item[1:]
    else:
        raise EventFormatError(f"event must be a tagged map or array, got {item!r:.80}")
    if tag == "BlockStored":
        return _stored(_fields(body, _STORED_FIELDS, "BlockStored"))
    if tag == "BlockRemoved":
        fields = _fields(body, _REMOVED_FIELDS, "BlockRemoved")
        return BlockRemoved(
            _hashes(fields.get("block_hashes"), "BlockRemoved"),
            _optional(fields.get("medium"), str, "BlockRemoved.medium"),
            _optional(fields.get("group_idx"), int, "BlockRemoved.group_idx"),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if isinstance(tag, str):
        return None  # a newer vLLM's event type: skipped, counted by the caller
    raise EventFormatError(f"event type must be a string, got {tag!r:.80}")


def _stored(fields: dict[str, Any]) -> BlockStored:
    token_ids = fields.get("token_ids")
    block_size = fields.get("block_size")
    if not isinstance(token_ids, list) or not isinstance(block_size, int):
        raise EventFormatError("BlockStored needs token_ids (a list) and block_size")
    parent = fields.get("parent_block_hash")
    if parent is not None:
        parent = _hash(parent, "BlockStored.parent_block_hash")
    lora = fields.get("lora_name")
    if lora is None and fields.get("lora_id") is not None:
        lora = str(fields["lora_id"])  # vLLM before lora_name: the adapter's int id
    extra = fields.get("extra_keys")
    return BlockStored(
        _hashes(fields.get("block_hashes"), "BlockStored"),
        parent,
        token_ids,
        block_size,
        _optional(fields.get("medium"), str, "BlockStored.medium"),
        _optional(lora, str, "BlockStored.lora_name"),
        extra if isinstance(extra, list) else None,
        _optional(fields.get("group_idx"), int, "BlockStored.group_idx"),
    )


def _hashes(value: Any, what: str) -> list[EngineHash]:
    if not isinstance(value, list):
        raise EventFormatError(f"{what}.block_hashes must be a list, got {value!r:.80}")
    for item in value:
        if type(item) is not int and not isinstance(item, bytes):
            _hash(item, f"{what}.block_hashes")
    return value


def _hash(value: Any, what: str) -> EngineHash:
    if (isinstance(value, int) and not isinstance(value, bool)) or isinstance(
        value, bytes
    ):
        return value
    raise EventFormatError(f"{what} must be an int or bytes, got {value!r:.80}")


def _optional(value: Any, kind: type[Any], what: str) -> Any:
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise EventFormatError(
        f"{what} must be a {kind.__name__} or nil, got {value!r:.80}"
    )
