"""The one exception tree of kvtier.

Every error kvtier raises is a :class:`KVTierError`. Errors of lower layers
(``OSError``, ``sqlite3.Error``, codec errors) are mapped at the boundary with
``raise ... from exc`` so no foreign exception reaches a user. Errors that are also bad
arguments subclass ``ValueError`` too, so ``except ValueError`` keeps working for
callers that expect it::

    KVTierError
    ├── ConfigError        (ValueError)  a config key has a value that is not allowed
    ├── LayoutError        (ValueError)  a block does not match its KV layout
    ├── KeyFormatError     (ValueError)  token ids or engine hashes that cannot be keys
    ├── EventFormatError   (ValueError)  an engine KV event batch that does not decode
    ├── RouteError         (ValueError)  a route request that cannot be answered
    ├── UnknownPodError    (LookupError) the router follows no pod of that id
    ├── TraceFormatError   (ValueError)  a request trace line the simulator cannot read
    ├── StoreClosedError                 the store was used after close()
    ├── StorageError                     a tier could not do its I/O
    │   └── CorruptBlockError            a stored block failed its checksum
    ├── ClusterError                     etcd could not be reached in time
    └── NodeError                        talking to a kvtier node failed
        ├── ConnectionLostError          cannot reach the node, or it hung up (retried)
        ├── RequestTimeoutError          no answer in time (retried when safe)
        ├── AuthenticationError          wrong or missing token
        ├── ProtocolError                a malformed or oversized frame
        └── RemoteError                  the node refused the request (``code``)

A cache that cannot read or write degrades to a miss or ``False`` and the request goes
on: running out of space is not an exception, and neither is a corrupted block on a read
path (it is quarantined, counted and reported as a miss). ``StorageError`` surfaces only
where a caller asked for the I/O explicitly (opening a data directory,
``check(fix=True)``).
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ClusterError",
    "ConfigError",
    "ConnectionLostError",
    "CorruptBlockError",
    "EventFormatError",
    "KVTierError",
    "KeyFormatError",
    "LayoutError",
    "NodeError",
    "ProtocolError",
    "RemoteError",
    "RequestTimeoutError",
    "RouteError",
    "StorageError",
    "StoreClosedError",
    "TraceFormatError",
    "UnknownPodError",
]


class KVTierError(Exception):
    """Base class of every error kvtier raises."""


class ConfigError(KVTierError, ValueError):
    """A configuration value is missing, malformed or outside what is allowed.

    The message names the key (``memory.capacity_bytes``) and what is allowed.
    """


class LayoutError(KVTierError, ValueError):
    """A block's dtype, shape or byte size does not match its KV layout."""


class KeyFormatError(KVTierError, ValueError):
    """Token ids or engine-computed hashes that cannot be turned into block keys."""


class EventFormatError(KVTierError, ValueError):
    """An engine's KV event batch (vLLM's msgpack wire format) that does not decode."""


class RouteError(KVTierError, ValueError):
    """A route request that cannot be answered: no prompt, an unknown model, or text
    without a tokenizer that can be loaded here."""


class UnknownPodError(KVTierError, LookupError):
    """The router follows no pod of that id."""


class TraceFormatError(KVTierError, ValueError):
    """A line of a request trace or access log is malformed.

    The message names the file, the line number and what was wrong; the line's
    number is also in ``line_number`` (0 when the error is not about one line).
    """

    def __init__(self, message: str, line_number: int = 0) -> None:
        super().__init__(message)
        self.line_number = line_number


class StoreClosedError(KVTierError):
    """The store (or one of its tiers) was used after ``close()``."""


class StorageError(KVTierError):
    """A tier could not do its I/O (the original ``OSError`` is the ``__cause__``)."""


class CorruptBlockError(StorageError):
    """A block read back from outside memory failed its checksum or framing."""


class ClusterError(KVTierError):
    """The cluster's coordination store (etcd) could not be reached in time."""


class NodeError(KVTierError):
    """Talking to a kvtier node failed."""


class ConnectionLostError(NodeError):
    """The node cannot be reached, or the connection broke mid-request."""


class RequestTimeoutError(NodeError):
    """The node did not answer in time."""


class AuthenticationError(NodeError):
    """The node refused the token (or its absence)."""


class ProtocolError(NodeError):
    """A frame was malformed, of an unknown version, or larger than allowed."""


class RemoteError(NodeError):
    """The node answered a request with an error.

    Attributes:
        code: The node's error code (``bad_request``, ``unknown_op``, ``too_large``,
            ``unauthorized``, ``unavailable``, ``internal``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
