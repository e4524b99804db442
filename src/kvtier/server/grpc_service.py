"""The node's gRPC service (``kvtier.v1.KVCacheService``) for non-Python clients.

The API is the store API of seed 001 (StoreKVCache, RetrieveKVCache, DeleteKVCache,
ListKVCacheKeys) plus MatchPrefix; ``_grpc/kvcache.proto`` documents each call. It runs
on grpc.aio in the node's event loop; calls that copy or may touch a disk run in a
worker thread. Bad arguments fail with INVALID_ARGUMENT and a message; a missing or
wrong token with UNAUTHENTICATED. A tenant's token (``server.tenant_tokens``) works on
its own blocks only (:mod:`kvtier.server.tenants`); listing answers it
PERMISSION_DENIED. Messages may be as large as ``server.max_payload_bytes`` (capped at
gRPC's 2 GiB).

Regenerate the stubs after editing the .proto::

    python -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src \\
        --pyi_out=src src/kvtier/server/_grpc/kvcache.proto
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import xxhash

from kvtier.core.keys import BlockKey, KeyChain
from kvtier.server._grpc import kvcache_pb2 as pb
from kvtier.server._grpc import kvcache_pb2_grpc as pb_grpc
from kvtier.server.tenants import Caller, identify, scope_keys

if TYPE_CHECKING:
    from kvtier.server.node import Node

__all__ = ["KVCacheService", "name_key", "start_grpc"]

_MAX_MESSAGE = (1 << 31) - 1
_NAME_PREFIX = b"kvtier-name-v1\0"


def name_key(name: str) -> BlockKey:
    """The block key of a string-named block (seed 001's keys)."""
    return BlockKey(xxhash.xxh3_128_digest(_NAME_PREFIX + name.encode()))


async def start_grpc(node: Node, host: str, port: int) -> grpc.aio.Server:
    limit = min(node.config.server.max_payload_bytes, _MAX_MESSAGE)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    pb_grpc.add_KVCacheServiceServicer_to_server(  # type: ignore[no-untyped-call]
        KVCacheService(node), server
    )
    cert, key = node.config.server.tls_cert, node.config.server.tls_key
    address = f"{host}:{port}"
    if cert:
        with open(cert, "rb") as c, open(key, "rb") as k:
            credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    await server.start()
    return server


class KVCacheService(pb_grpc.KVCacheServiceServicer):
    """Implements the service over the node's store."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = node.store

    async def StoreKVCache(  # noqa: N802 - names come from the .proto
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        caller = await self._authorize(context)
        names = [await _key(b.key, b.name, context) for b in request.blocks]
        keys = await self._scoped(caller, names, context)
        parent = request.parent or None
        if parent is not None and len(parent) != 16:
            await _invalid(context, "parent must be a 16-byte key")
        chain = KeyChain(
            keys,
            None,
            scope_keys(caller, [parent])[0] if parent else None,
            group=caller.tenant or request.group or None,
            chained=not request.unchained,
        )
        blocks = [b.data for b in request.blocks]
        if any(not data for data in blocks):
            await _invalid(context, "every block needs data")
        result = await asyncio.to_thread(self.store.put, chain, blocks)
        return pb.StoreKVCacheResponse(stored=list(result.stored))

    async def RetrieveKVCache(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        caller = await self._authorize(context)
        named = await _keys(request.keys, request.names, context)
        keys = await self._scoped(caller, named, context)
        arrays = await asyncio.to_thread(self.store.get, keys)
        blocks = [
            pb.Block(key=key, data=arr.tobytes())
            for key, arr in zip(named, arrays, strict=False)
        ]
        return pb.RetrieveKVCacheResponse(blocks=blocks)

    async def DeleteKVCache(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        caller = await self._authorize(context)
        named = await _keys(request.keys, request.names, context)
        keys = await self._scoped(caller, named, context)
        removed = await asyncio.to_thread(self.store.delete, keys)
        return pb.DeleteKVCacheResponse(removed=removed)

    async def ListKVCacheKeys(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        caller = await self._authorize(context)
        if not caller.is_operator:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "listing needs the operators' token, not a tenant's",
            )
        infos = self.store.list(request.group or None, request.limit or 1000)
        return pb.ListKVCacheKeysResponse(
            keys=[
                pb.KeyInfo(
                    key=i.key,
                    nbytes=i.nbytes,
                    group=i.group,
                    tiers=list(i.tiers),
                    expire_at=i.expire_at if i.expire_at != float("inf") else 0.0,
                )
                for i in infos
            ]
        )

    async def MatchPrefix(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        caller = await self._authorize(context)
        keys = await self._scoped(
            caller, await _keys(request.keys, [], context), context
        )
        match = self.store.match(keys, window=request.window or None)
        return pb.MatchPrefixResponse(num_blocks=match.num_blocks, tiers=match.tiers)

    async def _authorize(self, context: grpc.aio.ServicerContext) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        caller = identify(self.node.config.server, token if scheme == "Bearer" else "")
        if caller is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "send metadata authorization: Bearer <the node's token>",
            )
            raise AssertionError("abort raises")  # pragma: no cover
        return caller

    async def _scoped(
        self,
        caller: Caller,
        keys: Sequence[BlockKey],
        context: grpc.aio.ServicerContext,
    ) -> list[BlockKey]:
        """At most max_keys_per_request keys, as the store knows them for caller."""
        most = self.node.config.server.max_keys_per_request
        if len(keys) > most:
            await _invalid(context, f"{len(keys)} keys is over {most} per request")
        return scope_keys(caller, keys)


async def _invalid(context: grpc.aio.ServicerContext, message: str) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    raise AssertionError("abort raises")  # pragma: no cover


async def _key(key: bytes, name: str, context: grpc.aio.ServicerContext) -> BlockKey:
    if key and name:
        await _invalid(context, "a block has a key or a name, not both")
    if name:
        return name_key(name)
    if len(key) != 16:
        await _invalid(context, f"keys are 16 bytes, got {len(key)}")
    return BlockKey(key)


async def _keys(
    keys: Sequence[bytes], names: Sequence[str], context: grpc.aio.ServicerContext
) -> list[BlockKey]:
    if keys and names:
        await _invalid(context, "pass keys or names, not both")
    return [await _key(k, "", context) for k in keys] + [name_key(n) for n in names]
