"""``kvtier.AsyncClusterClient``: one pooled cache over every node of a cluster.

The client follows the cluster's membership in etcd and places each block itself by
rendezvous hashing over the live nodes (:mod:`kvtier.core.placement`): no lookup
service sits on the data path, and a join or leave moves only about 1/N of the keys.

* **put** sends each block to its R replicas in parallel; it is stored when at least
  W replicas stored it (R and W come from the cluster's settings in etcd).
* **get / match / contains** ask each block's replicas in preference order, all blocks
  of one round in parallel, and go on with the next replica only for blocks still
  missing. One more candidate than R is asked too: after a node joins, the node that
  held a block before is next in line, so blocks move to their new owner lazily, on
  first read. A block found anywhere but on its first replica is written back to the
  replicas that missed it (read repair), in the background.
* A node that fails a request is skipped for a few seconds (until membership drops it
  or it answers again), so a dead node costs one failed attempt, not every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.client.async_client import AsyncClient
from kvtier.cluster.etcd import Etcd
from kvtier.cluster.membership import Membership
from kvtier.core.index import window_match_end
from kvtier.core.keys import BlockKey, KeyChain
from kvtier.core.placement import Member, Placement
from kvtier.errors import ClusterError, LayoutError, NodeError
from kvtier.layout import KVLayout, block_arrays, writable_bytes
from kvtier.results import BlockInfo, Match, PutResult

__all__ = ["AsyncClusterClient"]

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
_SUSPECT_SECONDS = 3.0


class AsyncClusterClient:
    """A client of a whole cluster; the store API of :class:`AsyncClient`.

    Args:
        etcd: etcd endpoints (``host:port`` list or a comma-separated string).
        cluster: The cluster's name.
        token, tls, shared_memory, timeout, retries: As for :class:`AsyncClient`,
            applied to each node's client.
    """

    def __init__(
        self,
        etcd: Sequence[str] | str,
        cluster: str,
        *,
        timeout: float = 5.0,
        retries: int = 1,
        **node_options: Any,
    ) -> None:
        endpoints = etcd.split(",") if isinstance(etcd, str) else list(etcd)
        self._etcd = Etcd([e.strip() for e in endpoints if e.strip()])
        self.membership = Membership(self._etcd, cluster)
        self.membership.listeners.append(self._on_membership)
        self._node_options = {"timeout": timeout, "retries": retries, **node_options}
        self._placement = Placement([])
        self._clients: dict[str, AsyncClient] = {}
        self._suspect: dict[str, float] = {}
        self._repairs: set[asyncio.Task[None]] = set()

    async def connect(self) -> AsyncClusterClient:
        try:
            await self._etcd.connect()
            await self.membership.start_watching()
            if not self.membership.nodes:
                raise ClusterError(
                    f"cluster {self.membership.cluster!r} has no live nodes"
                )
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        for task in list(self._repairs):
            task.cancel()
        await self.membership.stop()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        await self._etcd.close()

    async def __aenter__(self) -> AsyncClusterClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def nodes(self) -> list[str]:
        """Ids of the live nodes."""
        return sorted(self.membership.nodes)

    def _on_membership(self, membership: Membership) -> None:
        members = [
            Member(info.node_id, float(max(info.capacity_bytes, 1)), info.zone)
            for info in membership.nodes.values()
        ]
        self._placement = Placement(members)
        for gone in set(self._clients) - set(membership.nodes):
            client = self._clients.pop(gone)
            task = asyncio.get_event_loop().create_task(client.close())
            self._repairs.add(task)
            task.add_done_callback(self._repairs.discard)

    # ------------------------------------------------------------- nodes

    async def _client(self, node_id: str) -> AsyncClient:
        client = self._clients.get(node_id)
        if client is None:
            info = self.membership.nodes.get(node_id)
            if info is None:
                raise ClusterError(f"node {node_id} left the cluster")
            client = AsyncClient(info.address, **self._node_options)
            self._clients[node_id] = client
            await client.connect()
        return client

    def _usable(self, node_id: str) -> bool:
        until = self._suspect.get(node_id, 0.0)
        return node_id in self.membership.nodes and time.monotonic() >= until

    async def _on_node(self, node_id: str, call: str, *args: Any) -> Any:
        """``call`` on a node; a failing node is suspected for a while (``None``)."""
        try:
            client = await self._client(node_id)
            return await getattr(client, call)(*args)
        except (NodeError, ClusterError, OSError) as exc:
            log.info("node %s failed %s: %s", node_id, call, exc)
            self._suspect[node_id] = time.monotonic() + _SUSPECT_SECONDS
            broken = self._clients.pop(node_id, None)
            if broken is not None:
                with contextlib.suppress(Exception):
                    await broken.close()
            return None

    def _candidates(self, keys: Sequence[BlockKey]) -> list[list[str]]:
        replicas = self.membership.settings.replicas
        return self._placement.replicas(keys, replicas + 1)

    # ------------------------------------------------------------- writes

    async def put(
        self,
        keys: Sequence[BlockKey],
        blocks: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> PutResult:
        """Stores each block on its R replicas; stored once W of them have it."""
        arrays = block_arrays(keys, blocks, layout)
        replicas = self.membership.settings.replicas
        targets = self._placement.replicas(keys, replicas)
        counts = await self._scatter_put(keys, arrays, targets)
        quorum = self.membership.settings.write_quorum
        return PutResult(tuple(count >= quorum for count in counts))

    async def _scatter_put(
        self,
        keys: Sequence[BlockKey],
        arrays: Sequence[Array],
        targets: Sequence[Sequence[str]],
    ) -> list[int]:
        per_node: dict[str, list[int]] = defaultdict(list)
        for index, nodes in enumerate(targets):
            for node_id in nodes:
                if self._usable(node_id):
                    per_node[node_id].append(index)
        parents = keys.parents() if isinstance(keys, KeyChain) else [None] * len(keys)
        group = keys.quota_group if isinstance(keys, KeyChain) else None
        results = await asyncio.gather(
            *(
                self._on_node(
                    node_id,
                    "put",
                    KeyChain(
                        [keys[i] for i in idx],
                        None,
                        group=group,
                        parents=[parents[i] for i in idx],
                    ),
                    [arrays[i] for i in idx],
                )
                for node_id, idx in per_node.items()
            )
        )
        counts = [0] * len(keys)
        for idx, result in zip(per_node.values(), results, strict=True):
            for i, stored in zip(idx, result.stored if result else [], strict=False):
                counts[i] += bool(stored)
        return counts

    async def delete(self, keys: Sequence[BlockKey]) -> int:
        """Deletes blocks from every node that may hold them; returns how many were
        stored somewhere."""
        stored = sum(await self.contains(keys))
        await self._on_every_candidate("delete", keys)
        return stored

    async def finish(self, keys: Sequence[BlockKey]) -> None:
        """Hints that the prompt ``keys`` is finished, to every node that may hold
        its blocks (each hears its own blocks, in prompt order)."""
        await self._on_every_candidate("finish", keys)

    async def _on_every_candidate(self, method: str, keys: Sequence[BlockKey]) -> None:
        """Calls ``method`` on every node that may hold some of ``keys``, with those."""
        per_node: dict[str, list[BlockKey]] = defaultdict(list)
        for key, nodes in zip(keys, self._candidates(keys), strict=True):
            for node_id in nodes:
                per_node[node_id].append(key)
        await asyncio.gather(
            *(
                self._on_node(node_id, method, subset)
                for node_id, subset in per_node.items()
            )
        )

    # ------------------------------------------------------------- reads

    async def get_blocks(self, keys: Sequence[BlockKey]) -> list[Array | None]:
        """Every stored block of ``keys`` (``None`` where no replica has it)."""
        found: list[Array | None] = [None] * len(keys)
        candidates = self._candidates(keys)
        missed: dict[int, list[str]] = defaultdict(list)
        for rank in range(max((len(c) for c in candidates), default=0)):
            wanted = [i for i, arr in enumerate(found) if arr is None]
            per_node = self._by_node(wanted, candidates, rank)
            if not per_node:
                continue  # this rank's nodes are all suspect: the next rank may answer
            results = await asyncio.gather(
                *(
                    self._on_node(node_id, "get_blocks", [keys[i] for i in idx])
                    for node_id, idx in per_node.items()
                )
            )
            for (node_id, idx), blocks in zip(per_node.items(), results, strict=True):
                for i, block in zip(idx, blocks or [None] * len(idx), strict=True):
                    if block is None:
                        missed[i].append(node_id)
                    else:
                        found[i] = block
        self._repair(keys, found, missed)
        return found

    def _by_node(
        self, wanted: list[int], candidates: list[list[str]], rank: int
    ) -> dict[str, list[int]]:
        per_node: dict[str, list[int]] = defaultdict(list)
        for i in wanted:
            if rank < len(candidates[i]) and self._usable(candidates[i][rank]):
                per_node[candidates[i][rank]].append(i)
        return per_node

    def _repair(
        self,
        keys: Sequence[BlockKey],
        found: list[Array | None],
        missed: dict[int, list[str]],
    ) -> None:
        """Writes blocks found elsewhere back to the replicas that missed them."""
        replicas = self.membership.settings.replicas
        targets = self._placement.replicas(keys, replicas)
        for i, nodes in missed.items():
            block = found[i]
            owed = [n for n in nodes if n in targets[i]]
            if block is None or not owed:
                continue
            for node_id in owed:
                task = asyncio.get_event_loop().create_task(
                    self._on_node(
                        node_id,
                        "put",
                        KeyChain([keys[i]], None, chained=False),
                        [block],
                    )
                )
                self._repairs.add(task)
                task.add_done_callback(self._repairs.discard)

    async def get(
        self, keys: Sequence[BlockKey], *, layout: KVLayout | None = None
    ) -> list[Array]:
        """The leading stored blocks of ``keys``, wherever they live."""
        blocks = await self.get_blocks(keys)
        leading: list[Array] = []
        for block in blocks:
            if block is None:
                break
            leading.append(layout.view(block) if layout is not None else block)
        return leading

    async def get_into(
        self,
        keys: Sequence[BlockKey],
        outs: Sequence[Any],
        *,
        layout: KVLayout | None = None,
    ) -> int:
        targets = [writable_bytes(out, layout) for out in outs[: len(keys)]]
        blocks = await self.get(keys)
        for block, target in zip(blocks, targets, strict=False):
            if target.nbytes != block.nbytes:
                raise LayoutError(
                    f"a buffer holds {target.nbytes} bytes, a block {block.nbytes}"
                )
            np.copyto(target, block)
        return len(blocks)

    async def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        present = [False] * len(keys)
        candidates = self._candidates(keys)
        for rank in range(max((len(c) for c in candidates), default=0)):
            wanted = [i for i, hit in enumerate(present) if not hit]
            per_node = self._by_node(wanted, candidates, rank)
            if not per_node:
                continue
            results = await asyncio.gather(
                *(
                    self._on_node(node_id, "contains", [keys[i] for i in idx])
                    for node_id, idx in per_node.items()
                )
            )
            for idx, answer in zip(per_node.values(), results, strict=True):
                for i, hit in zip(idx, answer or [], strict=False):
                    present[i] = present[i] or hit
        return present

    async def match(
        self, keys: Sequence[BlockKey], *, window: int | None = None
    ) -> Match:
        """Leading stored blocks (see ``TieredStore.match``), across the cluster:
        ``tiers`` names the node serving each block (of the window's blocks only,
        for a sliding-window match)."""
        present = await self.contains(keys)
        if window is None:
            count = present.index(False) if False in present else len(present)
            start = 0
        else:
            count = window_match_end(present, window)
            start = max(0, count - window)
        owners = self._placement.replicas(keys[start:count], 1)
        return Match(count, tuple(nodes[0] if nodes else "" for nodes in owners))

    async def list(
        self, group: str | None = None, limit: int | None = None
    ) -> list[BlockInfo]:
        results = await asyncio.gather(
            *(self._on_node(node_id, "list", group, limit) for node_id in self.nodes)
        )
        seen: dict[bytes, BlockInfo] = {}
        for infos in results:
            for info in infos or []:
                seen.setdefault(info.key, info)
        merged = list(seen.values())
        return merged[:limit] if limit is not None else merged

    async def prefetch(self, keys: Sequence[BlockKey]) -> int:
        per_node: dict[str, list[BlockKey]] = defaultdict(list)
        for key, nodes in zip(keys, self._placement.replicas(keys, 1), strict=True):
            if nodes:
                per_node[nodes[0]].append(key)
        results = await asyncio.gather(
            *(
                self._on_node(node_id, "prefetch", subset)
                for node_id, subset in per_node.items()
            )
        )
        return sum(r or 0 for r in results)

    async def stats(self) -> dict[str, Any]:
        """Each node's status, by node id (``None`` for a node that did not answer)."""
        results = await asyncio.gather(
            *(self._on_node(node_id, "stats") for node_id in self.nodes)
        )
        return dict(zip(self.nodes, results, strict=True))

    async def ping(self) -> None:
        await asyncio.gather(*(self._on_node(n, "ping") for n in self.nodes))
