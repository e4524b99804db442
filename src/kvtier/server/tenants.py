"""Who a request comes from, and what a tenant may see: one place for every interface.

A node has at most one operators' token (``server.auth_token``: sees and does
everything) and any number of tenant tokens (``server.tenant_tokens``). A request
carrying a tenant token is that tenant's, and the node confines it:

* **Keys are scoped.** Every key a tenant names is replaced, on the way in, by
  ``blake2b(tenant || key)`` (16 bytes). Two tenants naming the same key name two
  different blocks, so a tenant can neither read, match, delete nor even detect
  another's block (a put never answers "already stored" for someone else's), even if
  it computes keys in the other's namespace. blake2b, not the xxh3 of block keys: a
  hostile tenant may search for collisions, and a cryptographic hash makes that
  hopeless; no secret is needed, since distinct inputs are all it takes.
* **The quota group is the tenant.** Its blocks count against ``store.quotas`` under
  the tenant's name, whatever group the request names.
* **No view of the whole.** Listings, status, metrics and cluster views cover every
  tenant, so they stay with the operators; so does the same-host path, whose mapped
  arena holds every tenant's blocks.

Timing: a tenant's lookup of a key it never stored is a miss in the same dict lookup
whether or not another tenant stored the unscoped key (the scoped keys differ), so a
miss takes no longer or shorter because of someone else's blocks. What a tenant can
observe is load: a busy node answers everyone more slowly.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.config import ServerConfig
from kvtier.core.keys import BlockKey

__all__ = ["Caller", "identify", "scope_key", "scope_keys"]

_SCOPE_PREFIX = b"kvtier-tenant-v1\0"


@dataclass(frozen=True)
class Caller:
    """Whoever presented a token: ``tenant`` is ``None`` for operators (and for
    everyone when the node has no token)."""

    tenant: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.tenant is None


OPERATOR = Caller()


def identify(server: ServerConfig, token: str) -> Caller | None:
    """The caller a token belongs to, or ``None`` when it is no valid token.

    Every configured token is compared, in constant time, whatever matches: how long
    this takes tells nothing about which token came close.
    """
    if not server.auth_token:
        return OPERATOR
    found: Caller | None = None
    if hmac.compare_digest(token.encode(), server.auth_token.encode()):
        found = OPERATOR
    for tenant, expected in server.tenant_tokens.items():
        if hmac.compare_digest(token.encode(), expected.encode()):
            found = Caller(tenant)
    return found


def scope_key(tenant: str, key: bytes) -> BlockKey:
    """The key under which ``tenant``'s block ``key`` is stored."""
    data = _SCOPE_PREFIX + tenant.encode() + b"\0" + bytes(key)
    return BlockKey(hashlib.blake2b(data, digest_size=16).digest())


def scope_keys(caller: Caller, keys: Sequence[bytes]) -> list[BlockKey]:
    """``keys`` as the store knows them for ``caller`` (unchanged for operators)."""
    if caller.tenant is None:
        return [BlockKey(key) for key in keys]
    return [scope_key(caller.tenant, key) for key in keys]
