"""Which nodes hold a block: weighted rendezvous hashing, zone-aware, R replicas.

Every node gets a score for every key; a key's replicas are the nodes with the highest
scores (highest random weight). With ``score = weight / -ln(u)`` and ``u`` a uniform
hash of (node, key), a node's share of keys is proportional to its weight (its
capacity), and a node joining or leaving moves only the keys it wins or held: about
1/N of them, and nothing else is reshuffled. Clients compute placement themselves from
the live membership, so no lookup service sits on the data path.

Keys are already uniform 128-bit hashes, so the per-node hash is a cheap integer mix of
the key's first 8 bytes with a per-node salt (splitmix64's finalizer), vectorized with
numpy over all keys and nodes at once: placing the 512 blocks of a 128k-token prompt
over 10 nodes costs well under a millisecond.

Zone awareness: replicas are taken in score order, but a node in a zone that already
holds a replica is passed over while nodes of unused zones remain, so R replicas land
in R zones when there are that many.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

__all__ = ["Member", "Placement"]

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True, slots=True)
class Member:
    """A node as placement sees it."""

    node_id: str
    weight: float = 1.0
    zone: str = ""


class Placement:
    """Ranks members for keys. Immutable: build a new one when membership changes."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = tuple(sorted(members, key=lambda m: m.node_id))
        ids = [m.node_id.encode() for m in self.members]
        self._salts = np.array([xxhash.xxh3_64_intdigest(i) for i in ids], np.uint64)
        self._weights = np.array([max(m.weight, 1e-9) for m in self.members])
        self._zones = [m.zone for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def scores(self, keys: Sequence[bytes]) -> np.ndarray:
        """``[len(keys), len(members)]`` rendezvous scores (higher wins)."""
        if not keys or not self.members:
            return np.zeros((len(keys), len(self.members)))
        prefixes = np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8")
        mixed = _splitmix(prefixes[:, None] ^ self._salts[None, :])
        unit = (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        unit = np.clip(unit, 1e-300, 1.0 - 1e-16)
        return np.asarray(self._weights[None, :] / -np.log(unit))

    def replicas(self, keys: Sequence[bytes], count: int) -> list[list[str]]:
        """For each key, the ids of its ``count`` replica nodes, best first."""
        if not self.members:
            return [[] for _ in keys]
        order = np.argsort(-self.scores(keys), axis=1)
        count = min(count, len(self.members))
        return [self._pick(row, count) for row in order]

    def ranked(self, keys: Sequence[bytes]) -> list[list[str]]:
        """For each key, every member's id in preference order (zone-aware)."""
        return self.replicas(keys, len(self.members))

    def _pick(self, row: np.ndarray, count: int) -> list[str]:
        chosen: list[int] = []
        used_zones: set[str] = set()
        passed: list[int] = []
        for index in row:
            zone = self._zones[index]
            if zone and zone in used_zones:
                passed.append(int(index))  # later, if zones run out
                continue
            chosen.append(int(index))
            used_zones.add(zone)
            if len(chosen) == count:
                break
        chosen += passed[: count - len(chosen)]
        return [self.members[i].node_id for i in chosen]


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective mix of 64-bit words (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return np.asarray((x ^ (x >> np.uint64(31))) & _MASK)
