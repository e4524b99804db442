"""The framing of a block stored outside memory: a 64-byte header, then the payload.

Every block that leaves memory (disk segments, shared-FS files, later remote tiers) is
written as one record, so every reader verifies it the same way::

    offset size field
         0    4 magic          b"KVT1"
         4    1 version        1
         5    1 codec id       0 none, 1 lz4, 2 zstd
         6    2 flags          0 (reserved)
         8   16 block key
        24    8 raw length     bytes of the block once decoded
        32    8 stored length  bytes of the payload that follows the header
        40    8 checksum       xxh3-64 of the stored payload
        48    8 expire_at      unix seconds, 0.0 = never (float64)
        56    4 reserved       0
        60    4 header check   low 32 bits of xxh3-64 of bytes 0..59

All integers are little-endian. The header carries its own check so a torn or stale
header is told apart from a torn payload, and the key, so a record found by position (a
scan after a crash, ``check()``) is self-describing.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from kvtier.core.keys import KEY_BYTES, BlockKey
from kvtier.errors import CorruptBlockError
from kvtier.layout import Codec, as_block_array, checksum, codec_by_id

__all__ = ["HEADER_BYTES", "RecordHeader", "decode_into", "encode", "pack", "unpack"]

log = logging.getLogger(__name__)

MAGIC = b"KVT1"
VERSION = 1
HEADER_BYTES = 64
_BODY = struct.Struct("<4sBBH16sQQQd4x")
_CHECK = struct.Struct("<I")
assert _BODY.size + _CHECK.size == HEADER_BYTES, "record header must be 64 bytes"


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """The decoded header of one stored block."""

    key: BlockKey
    codec_id: int
    raw_bytes: int
    stored_bytes: int
    checksum: int
    expire_at: float

    def pack(self) -> bytes:
        body = _BODY.pack(
            MAGIC,
            VERSION,
            self.codec_id,
            0,
            self.key,
            self.raw_bytes,
            self.stored_bytes,
            self.checksum,
            self.expire_at,
        )
        return body + _CHECK.pack(xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF)

    @classmethod
    def unpack(cls, data: Any) -> RecordHeader:
        """Parses and verifies a header.

        Raises:
            CorruptBlockError: Short, wrong magic or version, or a failed header check.
        """
        view = memoryview(data)
        if len(view) < HEADER_BYTES:
            raise CorruptBlockError(
                f"record header needs {HEADER_BYTES} bytes, got {len(view)}"
            )
        body = view[: _BODY.size]
        (stored_check,) = _CHECK.unpack_from(view, _BODY.size)
        if xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF != stored_check:
            raise CorruptBlockError("record header fails its check")
        magic, version, codec_id, _flags, key, raw, stored, check, expire_at = (
            _BODY.unpack(body)
        )
        if magic != MAGIC or version != VERSION:
            raise CorruptBlockError(f"record has magic {magic!r} version {version}")
        if len(key) != KEY_BYTES:  # pragma: no cover - struct guarantees 16 bytes
            raise CorruptBlockError("record key has the wrong length")
        return cls(BlockKey(key), codec_id, raw, stored, check, expire_at)


def encode(
    key: BlockKey, payload: Any, codec: Codec, expire_at: float = 0.0
) -> tuple[RecordHeader, Any]:
    """The header and stored payload of a block (the payload itself when uncompressed).

    Compression is kept only when it saves space, so incompressible KV stays raw.
    """
    raw = memoryview(payload).cast("B")
    stored: Any = raw
    codec_id = 0
    if codec.codec_id != 0:
        packed = codec.compress(raw)
        if len(packed) < len(raw):
            stored, codec_id = packed, codec.codec_id
    header = RecordHeader(
        key, codec_id, len(raw), len(stored), checksum(stored), expire_at
    )
    return header, stored


def decode_into(header: RecordHeader, stored: Any, out: memoryview) -> None:
    """Verifies ``stored`` against ``header`` and writes the block into ``out``.

    ``out`` may already hold ``stored`` (an uncompressed read straight into the
    destination); then only the checksum runs.

    Raises:
        CorruptBlockError: Wrong size, checksum mismatch, or undecodable payload.
    """
    if len(out) != header.raw_bytes:
        raise CorruptBlockError(
            f"block is {header.raw_bytes} bytes, destination holds {len(out)}"
        )
    if len(memoryview(stored)) != header.stored_bytes:
        raise CorruptBlockError(
            f"payload is {len(memoryview(stored))} bytes, header says "
            f"{header.stored_bytes}"
        )
    if checksum(stored) != header.checksum:
        raise CorruptBlockError(f"checksum mismatch for block {header.key.hex()}")
    if header.codec_id == 0:
        if stored is not out:
            out[:] = stored
        return
    codec_by_id(header.codec_id).decompress_into(stored, out)


def pack(key: BlockKey, block: Any, codec: Codec, expire_at: float) -> bytes:
    """One record as bytes (for stores that take a single value: Redis, S3)."""
    raw = np.ascontiguousarray(as_block_array(block)).reshape(-1).view(np.uint8)
    header, stored = encode(
        key, raw.data, codec, expire_at if expire_at < 1e300 else 0.0
    )
    return header.pack() + bytes(stored)


def unpack(data: Any, key: BlockKey, now: float) -> np.ndarray[Any, Any] | None:
    """The verified block of a whole record, or ``None`` when it is not the block
    asked for, has expired, or fails its checks (logged)."""
    try:
        header = RecordHeader.unpack(data)
        if header.key != key:
            raise CorruptBlockError(f"record holds block {header.key.hex()}")
        if header.expire_at and header.expire_at <= now:
            return None
        out = np.empty(header.raw_bytes, dtype=np.uint8)
        decode_into(header, memoryview(data)[HEADER_BYTES:], out.data)
        return out
    except CorruptBlockError as exc:
        log.warning("corrupt record for block %s: %s", key.hex(), exc)
        return None
