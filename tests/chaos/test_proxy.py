"""A real node behind a faulty network: delays, partitions, resets, refusals.

Under each fault a client gets the exact bytes or a clear error (timeout, lost
connection), never wrong bytes; the node leaks no reservation or held slot; once the
fault ends, requests go through again.
"""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from typing import Any

import numpy as np
import pytest
from kvnode import wait_until

from kvtier import Namespace, block_keys
from kvtier.chaos.node import NodeProcess
from kvtier.chaos.proxy import ChaosProxy
from kvtier.client import Client
from kvtier.core.keys import KeyChain
from kvtier.errors import ConnectionLostError, NodeError, RequestTimeoutError

KiB = 1024


def chain(count: int) -> KeyChain:
    return block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(count)))


def block(i: int, nbytes: int = 64 * KiB) -> np.ndarray[Any, Any]:
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)


def exact(got: list[np.ndarray[Any, Any]], first: int, nbytes: int = 64 * KiB) -> bool:
    return all(np.array_equal(g, block(first + i, nbytes)) for i, g in enumerate(got))


def idle(node: NodeProcess) -> bool:
    """No reservation open, no slot held, no connection but this one."""
    with node.client() as client:
        status = client.stats()
    stats = status["stats"]
    return (
        stats["open_reservations"] == 0
        and stats["held_slots"] == 0
        and status["connections"] == 1
    )


def test_delays_slow_requests_and_never_change_bytes(chaos_node: NodeProcess) -> None:
    keys = chain(16)
    with ChaosProxy(chaos_node.address) as proxy:
        proxy.delay_s = 0.01
        with Client(proxy.address, shared_memory=False, timeout=10) as client:
            assert client.put(keys, [block(i) for i in range(16)])
            assert exact(client.get(keys), 0) and len(client.get(keys)) == 16
        assert proxy.counts["bytes"] > 2 * 16 * 64 * KiB


def test_a_partition_is_a_clear_timeout_and_heals(chaos_node: NodeProcess) -> None:
    keys = chain(4)
    with ChaosProxy(chaos_node.address) as proxy:
        client = Client(proxy.address, shared_memory=False, timeout=0.5, retries=0)
        with client:
            assert client.put(keys[:2], [block(0), block(1)])
            proxy.blackhole = True
            with pytest.raises(RequestTimeoutError):
                client.get(keys[:2])
            with pytest.raises(RequestTimeoutError):
                client.put(keys[2:], [block(2), block(3)])
            proxy.heal()
            got = client.get(keys)  # a fresh connection replaces the broken one
            assert len(got) in (2, 4) and exact(got, 0)  # the stalled put: all or none
    wait_until(lambda: idle(chaos_node), 10, "the node to let go of everything")


def test_resets_mid_payload_store_nothing_half_and_leak_nothing(
    chaos_node: NodeProcess,
) -> None:
    keys = chain(2)
    big = 1024 * KiB
    with ChaosProxy(chaos_node.address) as proxy:
        proxy.cut_after_bytes = 300 * KiB  # inside the put's payload
        client = Client(proxy.address, shared_memory=False, timeout=5, retries=1)
        with client, pytest.raises(ConnectionLostError):
            client.put(keys[:1], [block(0, big)])
        assert proxy.counts["cuts"] >= 2  # the put and its retry
        proxy.heal()
        with Client(proxy.address, shared_memory=False) as client:
            assert client.get(keys[:1]) == []  # nothing half-written is served
            assert client.put(keys, [block(0, big), block(1, big)])
        proxy.cut_after_bytes = 1500 * KiB  # inside the get's reply payload
        client = Client(proxy.address, shared_memory=False, timeout=5, retries=0)
        with client, pytest.raises(ConnectionLostError):
            client.get(keys)
    wait_until(lambda: idle(chaos_node), 10, "the node to let go of everything")
    with chaos_node.client() as client:
        got = client.get(keys)
        assert len(got) == 2 and exact(got, 0, big)


def test_refused_connections_are_a_clear_error(chaos_node: NodeProcess) -> None:
    with ChaosProxy(chaos_node.address) as proxy:
        proxy.refuse = True
        with pytest.raises(ConnectionLostError):
            Client(proxy.address, shared_memory=False, retries=0)
        proxy.heal()
        with Client(proxy.address, shared_memory=False) as client:
            client.ping()
        assert proxy.counts["refused"] == 1


def test_random_resets_under_load_never_serve_wrong_bytes(
    chaos_node: NodeProcess,
) -> None:
    keys = chain(200)
    acked: set[int] = set()
    served = 0
    stop = threading.Event()
    with ChaosProxy(chaos_node.address) as proxy:

        def cutter() -> None:
            rng = random.Random(2)
            while not stop.wait(rng.uniform(0.01, 0.1)):  # the fault's timing
                proxy.cut()

        thread = threading.Thread(target=cutter)
        thread.start()
        rng = random.Random(3)
        try:
            with Client(proxy.address, shared_memory=False, timeout=2) as client:
                for ops in itertools.count():  # until enough resets hit the load
                    if ops >= 200 and proxy.counts["cuts"] >= 10:
                        break
                    assert ops < 50_000, "the cutter never cut"
                    i = rng.randrange(200)
                    try:
                        if rng.random() < 0.5:
                            if client.put(keys[i : i + 1], [block(i)]):
                                acked.add(i)
                        else:
                            got = client.get(keys[i : i + 1])
                            assert exact(got, i), f"wrong bytes for block {i}"
                            served += len(got)
                    except NodeError:
                        pass  # a clear error is allowed; wrong bytes are not
        finally:
            stop.set()
            thread.join()
        assert acked and served
        with Client(proxy.address, shared_memory=False) as client:
            for i in sorted(acked):
                got = client.get(keys[i : i + 1])
                assert len(got) == 1 and exact(got, i), f"acked block {i}"
    wait_until(lambda: idle(chaos_node), 10, "the node to let go of everything")
