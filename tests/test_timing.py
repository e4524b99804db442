"""The bench helpers the tests share: free ports."""

from __future__ import annotations

from kvtier.bench.timing import free_port


def test_free_port_never_hands_out_a_recent_port_again() -> None:
    """The kernel may give the same free port to two binds in a row; servers started
    together (an etcd cluster's peer and client ports) must get distinct ones."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
