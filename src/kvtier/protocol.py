"""kvtier's binary protocol: frames, operations and their bodies. No I/O here.

Every message is one frame: a fixed 24-byte header, a msgpack body, then raw payload
bytes (block contents, never encoded, so they can be received straight into the
memory arena or a caller's buffer)::

    offset size field
         0    2 magic           b"KV"
         2    1 version         1
         3    1 kind            0 request, 1 reply, 2 error
         4    2 op              operation (see ``Op``)
         6    2 flags           0 (reserved)
         8    4 request id      echoed by the reply (pipelining)
        12    4 body length     bytes of the msgpack body (<= 16 MiB)
        16    8 payload length  bytes of raw payload after the body

Little-endian throughout. A connection starts with ``HELLO`` (version, token); the node
answers requests of one connection in order, so a client may pipeline several before
reading replies. A header that fails to parse, an unknown version, or a length beyond
the node's limits closes the connection after an error frame; an unknown operation or
a bad body gets an error reply and the connection goes on.

Keys travel as 16-byte msgpack ``bin``; payloads of several blocks are concatenated in
the order of the ``sizes`` list in the body.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from kvtier.errors import ProtocolError, RemoteError

__all__ = [
    "HEADER",
    "MAX_BODY_BYTES",
    "VERSION",
    "FrameHeader",
    "Kind",
    "Op",
    "decode_body",
    "encode_body",
    "encode_frame",
]

MAGIC = b"KV"
VERSION = 1
MAX_BODY_BYTES = 16 << 20
HEADER = struct.Struct("<2sBBHHIIQ")
assert HEADER.size == 24, "the frame header is 24 bytes"


class Kind(enum.IntEnum):
    REQUEST = 0
    REPLY = 1
    ERROR = 2


class Op(enum.IntEnum):
    """Operations; the body of each is documented in ``docs/protocol.md``."""

    HELLO = 1
    PING = 2
    ARENA = 3  # Unix socket only: the reply carries the arena's memfd
    PUT = 10
    GET = 11
    MATCH = 12
    CONTAINS = 13
    DELETE = 14
    LIST = 15
    PREFETCH = 16
    STATS = 17
    FINISH = 18
    RESERVE = 20
    COMMIT = 21
    ABORT = 22
    LEASE = 23
    RELEASE = 24


@dataclass(frozen=True, slots=True)
class FrameHeader:
    kind: Kind
    op: int
    request_id: int
    body_bytes: int
    payload_bytes: int

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            VERSION,
            self.kind,
            self.op,
            0,
            self.request_id,
            self.body_bytes,
            self.payload_bytes,
        )

    @classmethod
    def unpack(cls, data: Any, max_payload_bytes: int) -> FrameHeader:
        """Parses and bounds-checks a header.

        Raises:
            ProtocolError: Wrong magic or version, unknown kind, or a length over
                the limits.
        """
        magic, version, kind, op, _flags, request_id, body, payload = HEADER.unpack(
            data
        )
        if magic != MAGIC:
            raise ProtocolError(
                f"bad magic: frame starts with {bytes(magic)!r}, not {MAGIC!r}"
            )
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} is not {VERSION}")
        if kind not in (0, 1, 2):
            raise ProtocolError(f"frame kind {kind} is not 0, 1 or 2")
        if body > MAX_BODY_BYTES:
            raise ProtocolError(f"body of {body} bytes is over {MAX_BODY_BYTES}")
        if payload > max_payload_bytes:
            raise ProtocolError(
                f"payload of {payload} bytes is over the limit of {max_payload_bytes}"
            )
        return cls(Kind(kind), op, request_id, body, payload)


def encode_body(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def decode_body(data: Any) -> dict[str, Any]:
    """The msgpack body of a frame.

    Raises:
        ProtocolError: Not msgpack, or not a map.
    """
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, TypeError) as exc:
        raise ProtocolError(f"frame body is not msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"frame body must be a map, got {type(body).__name__}")
    return body


def encode_frame(
    kind: Kind,
    op: int,
    request_id: int,
    body: dict[str, Any],
    payload_bytes: int = 0,
) -> bytes:
    """Header and body of one frame (the payload follows separately)."""
    raw = encode_body(body)
    return FrameHeader(kind, op, request_id, len(raw), payload_bytes).pack() + raw


# ---------------------------------------------------------------- body fields
# A body that breaks these rules gets a ``bad_request`` error reply naming the field.


def field_keys(body: dict[str, Any], name: str = "keys") -> list[bytes]:
    """A list of 16-byte keys."""
    keys = body.get(name)
    if not isinstance(keys, list):
        raise _bad(f"{name} must be a list of 16-byte keys")
    for i, key in enumerate(keys):
        if not isinstance(key, bytes) or len(key) != 16:
            raise _bad(f"{name}[{i}] must be 16 bytes, got {_describe(key)}")
    return keys


def field_sizes(body: dict[str, Any], count: int) -> list[int]:
    """One non-negative size per key."""
    sizes = body.get("sizes")
    if not isinstance(sizes, list) or len(sizes) != count:
        raise _bad(f"sizes must be a list of {count} ints, one per key")
    for i, size in enumerate(sizes):
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise _bad(f"sizes[{i}] must be a positive int, got {size!r}")
    return sizes


def field_int(body: dict[str, Any], name: str, default: int | None = None) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{name} must be an int, got {value!r}")
    return value


def field_optional(
    body: dict[str, Any], name: str, kind: type[Any] | tuple[type[Any], ...]
) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        names = (
            "/".join(k.__name__ for k in kind)
            if isinstance(kind, tuple)
            else kind.__name__
        )
        raise _bad(f"{name} must be {names} or absent, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__


def _bad(message: str) -> RemoteError:
    return RemoteError("bad_request", message)
