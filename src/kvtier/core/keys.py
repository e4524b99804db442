"""Token ids -> chained block keys, seeded by a namespace.

A prompt is cut into blocks of ``block_tokens`` tokens. Block ``i``'s key is::

    key[-1] = H(seed, msgpack(namespace fields))          # the namespace root
    key[i]  = H(key[i-1] || little-endian uint32 token ids of block i)

so two equal keys mean two equal prefixes, in the same model, KV layout, tensor-parallel
rank, tenant, cache salt and LoRA. ``H`` is xxh3-128: deterministic across processes and
machines (never Python's ``hash()``, which LMCache users were bitten by), and fast
enough that keys for a 128k-token prompt take a fraction of a millisecond. The partial
tail block gets no key.

Engines that already hash their blocks (vLLM's ``request.block_hashes``) hand those in
through :func:`engine_keys`; each engine hash is folded into the same chain, so the
namespace still separates tenants even when the engine's hash does not.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NewType, overload

import msgpack
import numpy as np
import xxhash

from kvtier.errors import KeyFormatError

__all__ = [
    "KEY_BYTES",
    "MAX_BLOCK_TOKENS",
    "BlockKey",
    "HashAlgo",
    "KeyChain",
    "Namespace",
    "block_keys",
    "engine_keys",
    "hash_function",
    "key_hex",
]

BlockKey = NewType("BlockKey", bytes)
"""A 16-byte block key. Opaque: compare, hash and store it, never parse it."""

KEY_BYTES = 16
HashAlgo = Literal["xxh3_128"]
HashFn = Callable[[bytes], bytes]

_TOKEN_BYTES = 4
_MAX_TOKEN_ID = 2**32 - 1
_NAMESPACE_VERSION = "kvtier-ns-v1"


def hash_function(algo: HashAlgo) -> HashFn:
    """Returns the 16-byte digest function named by ``algo``.

    Raises:
        KeyFormatError: ``algo`` is not a known hash algorithm.
    """
    if algo == "xxh3_128":
        return xxhash.xxh3_128_digest
    raise KeyFormatError(f"hash_algo must be one of ['xxh3_128'], got {algo!r}")


def key_hex(key: bytes) -> str:
    """The key as lowercase hex, as it appears in logs, file names and the admin API."""
    return key.hex()


MAX_BLOCK_TOKENS = 2**31 - 1  # and the most tp_size: sane, and msgpack packs them


@dataclass(frozen=True)
class Namespace:
    """What a block key is seeded by. Equal keys need equal namespaces.

    Attributes:
        model_id: The model's name or path, as the engine knows it.
        layout_id: The KV layout fingerprint (``KVLayout.layout_id``); blocks of
            different dtypes, layer counts or head shapes never share keys.
        block_tokens: Tokens per block (default 256; a multiple of the engine's block
            size), in [1, 2**31 - 1].
        tp_rank: Tensor-parallel rank of the worker whose KV shard this is.
        tp_size: Tensor-parallel world size, in [1, 2**31 - 1].
        tenant: Tenant or instance group; also the quota group of the blocks.
        cache_salt: Extra per-request salt (vLLM's ``cache_salt``) to isolate users.
        lora_id: LoRA adapter name, or "" for the base model.
        hash_algo: Hash function of the key chain.
        hash_seed: Explicit seed of the namespace root hash.
    """

    model_id: str
    layout_id: str = ""
    block_tokens: int = 256
    tp_rank: int = 0
    tp_size: int = 1
    tenant: str = "default"
    cache_salt: str = ""
    lora_id: str = ""
    hash_algo: HashAlgo = "xxh3_128"
    hash_seed: int = 0
    _root: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.block_tokens <= MAX_BLOCK_TOKENS:
            raise KeyFormatError(
                f"block_tokens must be in [1, 2**31 - 1], got {self.block_tokens}"
            )
        if not 0 < self.tp_size <= MAX_BLOCK_TOKENS:
            raise KeyFormatError(
                f"tp_size must be in [1, 2**31 - 1], got {self.tp_size}"
            )
        if not 0 <= self.tp_rank < self.tp_size:
            raise KeyFormatError(
                f"tp_rank must be in [0, tp_size={self.tp_size}), got {self.tp_rank}"
            )
        if not 0 <= self.hash_seed < 2**64:
            raise KeyFormatError(
                f"hash_seed must be in [0, 2**64), got {self.hash_seed}"
            )
        fields = [
            _NAMESPACE_VERSION,
            self.model_id,
            self.layout_id,
            self.block_tokens,
            self.tp_rank,
            self.tp_size,
            self.tenant,
            self.cache_salt,
            self.lora_id,
        ]
        hash_fn = hash_function(self.hash_algo)  # validates hash_algo
        seed = self.hash_seed.to_bytes(8, "little")
        object.__setattr__(self, "_root", hash_fn(seed + msgpack.packb(fields)))

    @property
    def root(self) -> BlockKey:
        """The namespace root: the 'parent' of every prompt's first block."""
        return BlockKey(self._root)

    @property
    def quota_group(self) -> str:
        """The group whose byte quota the blocks of this namespace count against."""
        return self.tenant


class KeyChain(Sequence[BlockKey]):
    """The block keys of one prompt, in order, with the namespace they were made in.

    Slicing keeps the chain: ``chain[4:]`` knows that its first block's parent is
    ``chain[3]``, which the prefix-aware eviction policy needs. ``group`` names the
    quota group when there is no namespace (keys that came over the wire);
    ``chained=False`` marks keys of unrelated blocks, which have no parents; and
    ``parents`` gives each key's parent outright (a cluster node receives a scattered
    subset of a prompt's blocks, each still with its own parent).
    """

    __slots__ = ("_keys", "_parents", "chained", "group", "namespace", "parent")

    def __init__(
        self,
        keys: Sequence[BlockKey],
        namespace: Namespace | None,
        parent: BlockKey | None = None,
        *,
        group: str | None = None,
        chained: bool = True,
        parents: Sequence[BlockKey | None] | None = None,
    ) -> None:
        self._keys: tuple[BlockKey, ...] = tuple(keys)
        self.namespace = namespace
        self.parent = parent
        self.group = group
        self.chained = chained
        if parents is not None and len(parents) != len(self._keys):
            raise KeyFormatError(
                f"got {len(parents)} parents for {len(self._keys)} keys"
            )
        self._parents = tuple(parents) if parents is not None else None

    @property
    def quota_group(self) -> str:
        """The quota group: ``group``, else the namespace's, else ``"default"``."""
        if self.group is not None:
            return self.group
        return self.namespace.quota_group if self.namespace is not None else "default"

    @overload
    def __getitem__(self, index: int) -> BlockKey: ...

    @overload
    def __getitem__(self, index: slice) -> KeyChain: ...

    def __getitem__(self, index: int | slice) -> BlockKey | KeyChain:
        if isinstance(index, int):
            return self._keys[index]
        start, stop, step = index.indices(len(self._keys))
        if step != 1:
            raise KeyFormatError(f"a KeyChain slice needs step 1, got {step}")
        parent = self._keys[start - 1] if start > 0 else self.parent
        return KeyChain(
            self._keys[start:stop],
            self.namespace,
            parent if self.chained else None,
            group=self.group,
            chained=self.chained,
            parents=self._parents[start:stop] if self._parents is not None else None,
        )

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[BlockKey]:
        return iter(self._keys)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyChain):
            return self._keys == other._keys and self.parent == other.parent
        if isinstance(other, Sequence):
            return list(self._keys) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def parents(self) -> list[BlockKey | None]:
        """The parent of each key: ``parent`` for the first, the previous key after."""
        if self._parents is not None:
            return list(self._parents)
        if not self.chained or not self._keys:
            return [None] * len(self._keys)
        return [self.parent, *self._keys[:-1]]

    def __repr__(self) -> str:
        return f"KeyChain({len(self._keys)} keys, namespace={self.namespace!r})"


def block_keys(
    namespace: Namespace, token_ids: Any, parent: BlockKey | None = None
) -> KeyChain:
    """Chained keys of every full block of ``token_ids``.

    Args:
        namespace: What the keys are seeded by, including ``block_tokens``.
        token_ids: A list or tuple of ints, a 1-D integer numpy array, or a 1-D integer
            torch tensor (CPU or GPU). Ids must be in ``[0, 2**32)``.
        parent: The key of the block just before ``token_ids`` when they continue a
            prompt whose earlier blocks were keyed already (the router rebuilds
            chains from engine events this way); ``None`` starts at the namespace root.

    Returns:
        One key per full block; the partial tail block gets none.

    Raises:
        KeyFormatError: The ids are not 1-D integers in ``[0, 2**32)``.
    """
    data = memoryview(_token_bytes(token_ids))
    step = namespace.block_tokens * _TOKEN_BYTES
    num_blocks = len(data) // step
    hash_fn = hash_function(namespace.hash_algo)
    prev = namespace.root if parent is None else parent
    keys: list[BlockKey] = []
    append = keys.append
    for start in range(0, num_blocks * step, step):
        prev = BlockKey(hash_fn(prev + data[start : start + step]))
        append(prev)
    return KeyChain(keys, namespace, parent)


def engine_keys(namespace: Namespace, hashes: Sequence[bytes | int]) -> KeyChain:
    """Keys for blocks an engine already hashed (vLLM block hashes, SGLang page hashes).

    The engine hashes are treated as opaque and folded into the namespace's chain, so
    the result is isolated per tenant, LoRA and layout even when the engine's hashes are
    not.

    Args:
        namespace: What the keys are seeded by.
        hashes: The engine's hashes of consecutive blocks of one prompt, as bytes or as
            non-negative ints (vLLM's KV events carry 64-bit ints).

    Raises:
        KeyFormatError: A hash is neither bytes nor a non-negative int.
    """
    hash_fn = hash_function(namespace.hash_algo)
    prev = namespace.root
    keys: list[BlockKey] = []
    for position, engine_hash in enumerate(hashes):
        prev = BlockKey(
            hash_fn(prev + b"E" + _engine_hash_bytes(engine_hash, position))
        )
        keys.append(prev)
    return KeyChain(keys, namespace, None)


def _engine_hash_bytes(engine_hash: bytes | int, position: int) -> bytes:
    if isinstance(engine_hash, bytes | bytearray | memoryview):
        return bytes(engine_hash)
    if isinstance(engine_hash, int) and not isinstance(engine_hash, bool):
        if engine_hash < 0:
            raise KeyFormatError(
                f"engine hash #{position} must be non-negative, got {engine_hash}"
            )
        return engine_hash.to_bytes(max(8, (engine_hash.bit_length() + 7) // 8), "big")
    raise KeyFormatError(
        f"engine hash #{position} must be bytes or int, "
        f"got {type(engine_hash).__name__}"
    )


def _token_bytes(token_ids: Any) -> bytes | memoryview:
    """Token ids as little-endian uint32 bytes, without a copy when they already are."""
    if isinstance(token_ids, list | tuple | range):
        try:
            packed = array.array("I", token_ids)
        except (OverflowError, TypeError) as exc:
            raise KeyFormatError(
                f"token ids must be ints in [0, 2**32), got a bad element ({exc})"
            ) from exc
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            packed.byteswap()
        return packed.tobytes()
    arr = _as_numpy(token_ids)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise KeyFormatError(
            f"token ids must be a 1-D integer array, got {arr.ndim}-D {arr.dtype}"
        )
    if arr.dtype != np.dtype("<u4"):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _MAX_TOKEN_ID):
            raise KeyFormatError(
                f"token ids must be in [0, 2**32), got range "
                f"[{int(arr.min())}, {int(arr.max())}]"
            )
        arr = arr.astype("<u4")
    return np.ascontiguousarray(arr).data.cast("B")


def _as_numpy(token_ids: Any) -> np.ndarray[Any, Any]:
    if isinstance(token_ids, np.ndarray):
        return token_ids
    if hasattr(token_ids, "detach") and hasattr(token_ids, "cpu"):  # a torch tensor
        return np.asarray(token_ids.detach().cpu().numpy())
    raise KeyFormatError(
        "token ids must be a list, tuple, numpy array or torch tensor, "
        f"got {type(token_ids).__name__}"
    )
