"""A live node under malformed frames, abuse, dying clients, kills and fuzzing."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvnode import NodeProcess, wait_until
from kvwire import closed_by_peer, read_frame, recv_exact
from kvwire import hello as say_hello

from kvtier import Namespace, block_keys
from kvtier import protocol as proto
from kvtier.protocol import Kind, Op


def raw_connect(node: NodeProcess, hello: bool = True) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    if hello:
        kind, _body = say_hello(sock, node.token)
        assert kind == Kind.REPLY
    return sock


def still_serving(node: NodeProcess) -> None:
    with node.client(shared_memory=False, retries=0) as client:
        client.ping()


def test_bad_magic_gets_an_error_and_the_connection_closes(node: NodeProcess) -> None:
    with raw_connect(node) as sock:
        sock.sendall(b"XX" + bytes(22))
        kind, body = read_frame(sock)
        assert kind == Kind.ERROR and body["code"] == "bad_frame"
        assert "magic" in str(body["message"])
        assert closed_by_peer(sock)
    still_serving(node)


def test_declared_length_beyond_the_limit_closes(node: NodeProcess) -> None:
    with raw_connect(node) as sock:
        header = proto.FrameHeader(Kind.REQUEST, Op.PUT, 2, 0, 1 << 62).pack()
        sock.sendall(header)
        kind, body = read_frame(sock)
        assert kind == Kind.ERROR and "over the limit" in str(body["message"])
        assert closed_by_peer(sock)
    still_serving(node)


def test_unknown_op_and_bad_body_get_error_replies_and_the_connection_goes_on(
    node: NodeProcess,
) -> None:
    with raw_connect(node) as sock:
        sock.sendall(proto.encode_frame(Kind.REQUEST, 999, 2, {}))
        kind, body = read_frame(sock)
        assert kind == Kind.ERROR and body["code"] == "unknown_op"
        sock.sendall(
            proto.encode_frame(Kind.REQUEST, Op.MATCH, 3, {"keys": [b"short"]})
        )
        kind, body = read_frame(sock)
        assert kind == Kind.ERROR and body["code"] == "bad_request"
        assert "keys[0] must be 16 bytes" in str(body["message"])
        bad_body = (
            proto.FrameHeader(Kind.REQUEST, Op.PING, 4, 3, 0).pack() + b"\xc1\xc1\xc1"
        )
        sock.sendall(bad_body)
        kind, body = read_frame(sock)
        assert kind == Kind.ERROR
        sock.sendall(
            proto.encode_frame(
                Kind.REQUEST, Op.PUT, 5, {"keys": [bytes(16)], "sizes": [8]}, 4
            )
            + b"abcd"
        )
        kind, body = read_frame(
            sock
        )  # sizes disagree with the payload: drained, refused
        assert kind == Kind.ERROR and "add up to 8 bytes" in str(body["message"])
        sock.sendall(proto.encode_frame(Kind.REQUEST, Op.PING, 6, {}))
        assert read_frame(sock)[0] == Kind.REPLY


def test_truncated_streams_do_not_hurt_the_node(node: NodeProcess) -> None:
    for cut in (5, proto.HEADER.size + 3, proto.HEADER.size + 40):
        with raw_connect(node) as sock:
            frame = proto.encode_frame(
                Kind.REQUEST, Op.PUT, 2, {"keys": [bytes(16)], "sizes": [4096]}, 4096
            )
            sock.sendall((frame + bytes(4096))[:cut])
    still_serving(node)


def test_missing_or_wrong_token_is_refused(node_factory: object) -> None:
    node = node_factory(token="s3cret")  # type: ignore[operator]
    with raw_connect(node, hello=False) as sock:
        sock.sendall(proto.encode_frame(Kind.REQUEST, Op.PING, 1, {}))
        kind, body = read_frame(sock)
        assert kind == Kind.ERROR and body["code"] == "unauthorized"
        assert closed_by_peer(sock)
    with raw_connect(node, hello=False) as sock:
        sock.sendall(
            proto.encode_frame(
                Kind.REQUEST, Op.HELLO, 1, {"version": 1, "token": "wrong"}
            )
        )
        assert read_frame(sock)[1]["code"] == "unauthorized"
        assert closed_by_peer(sock)
    still_serving(node)


DYING_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from kvtier.client import Client
    from kvtier import Namespace, block_keys
    client = Client(sys.argv[1], shared_memory=True)
    keys = block_keys(Namespace(sys.argv[2], block_tokens=1), list(range(8)))
    reservation = client.reserve(keys, [1 << 20] * 8)
    assert reservation.statuses == ["reserved"] * 8
    print("reserved", flush=True)
    signal.pause()
    """
)


def memory_used(node: NodeProcess) -> int:
    with node.client(shared_memory=False) as client:
        return int(client.stats()["stats"]["tiers"]["memory"]["used_bytes"])


def test_a_client_that_dies_between_reserve_and_commit_leaks_nothing(
    node: NodeProcess,
) -> None:
    before = memory_used(node)
    with subprocess.Popen(
        [sys.executable, "-c", DYING_WRITER, node.address, uuid.uuid4().hex],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "reserved\n"
        assert memory_used(node) == before + 8 * (1 << 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(lambda: memory_used(node) == before, 10, "the slots to come back")


def proc_field(path: str, name: str) -> int:
    """A kB figure from a /proc file such as /proc/meminfo."""
    with open(path) as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} in {path}")


def shmem_kib() -> int:
    return proc_field("/proc/meminfo", "Shmem")


def test_the_arena_of_a_killed_node_does_not_leak(node_factory: object) -> None:
    node = node_factory()  # type: ignore[operator]
    before = shmem_kib()
    keys = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(48)))
    with node.client(shared_memory=True) as client:
        assert client.put(keys, [np.ones(1 << 20, np.uint8)] * 48)
    assert shmem_kib() >= before + 40 * 1024  # the node's arena holds ~48 MiB
    node.stop(signal.SIGKILL)
    wait_until(lambda: shmem_kib() < before + 16 * 1024, 10, "the arena to be freed")


def test_sigterm_drains_and_flushes_write_behind_to_disk(node_factory: object) -> None:
    node = node_factory("store.write_policy=write_back")  # type: ignore[operator]
    keys = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(6)))
    data = [np.full(4096, i, np.uint8) for i in range(6)]
    with node.client(shared_memory=False) as client:
        assert client.put(keys, data)
        assert client.stats()["stats"]["dirty_blocks"] >= 6
    assert node.stop(signal.SIGTERM) == 0
    restarted = node_factory(name="again")  # type: ignore[operator]
    restarted.stop()
    from kvtier import open as open_store

    with open_store(
        overrides={
            "store.data_dir": str(node.data_dir),
            "memory.capacity_bytes": "64MiB",
        }
    ) as store:
        got = store.get(keys)
        assert len(got) == 6 and all(
            np.array_equal(a, b) for a, b in zip(got, data, strict=True)
        )


FRAMES = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda kind, op, body, payload: (
            proto.FrameHeader(kind, op, 7, len(body), len(payload)).pack()
            + body
            + payload
        ),
        st.sampled_from([Kind.REQUEST, Kind.REPLY, Kind.ERROR]),
        st.integers(0, 40),
        st.binary(max_size=64),
        st.binary(max_size=64),
    ),
)


def node_rss_kib(node: NodeProcess) -> int:
    return proc_field(f"/proc/{node.proc.pid}/status", "VmRSS")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(frames=st.lists(FRAMES, min_size=1, max_size=4))
def test_fuzzed_frames_never_crash_the_node(
    node: NodeProcess, frames: list[bytes]
) -> None:
    with raw_connect(node) as sock:
        sock.settimeout(5)
        try:
            for frame in frames:
                sock.sendall(frame)
        except OSError:
            pass  # the node may hang up on garbage: that is allowed
    assert node.proc.poll() is None


def test_after_fuzzing_the_node_serves_and_memory_is_bounded(node: NodeProcess) -> None:
    before = node_rss_kib(node)
    deadline = time.monotonic() + 3
    rng = np.random.default_rng(1)
    while time.monotonic() < deadline:
        junk = proto.FrameHeader(
            Kind.REQUEST, int(rng.integers(0, 30)), 1, int(rng.integers(0, 64)), 0
        ).pack()
        with raw_connect(node) as sock, contextlib.suppress(OSError):
            sock.sendall(junk + rng.bytes(int(rng.integers(0, 64))))
    still_serving(node)
    assert node_rss_kib(node) < before + 64 * 1024


@pytest.mark.parametrize("fmt", [struct.pack("<I", 7)])
def test_a_short_header_then_eof_is_harmless(node: NodeProcess, fmt: bytes) -> None:
    with raw_connect(node) as sock:
        sock.sendall(fmt)
    still_serving(node)


def held_slots(node: NodeProcess) -> int:
    with node.client(shared_memory=False, retries=0) as client:
        return int(client.stats()["stats"]["held_slots"])


def test_a_slow_tcp_reader_gets_the_bytes_it_asked_for(node_factory: Any) -> None:
    """A TCP get's blocks go out of the arena as the socket takes them: they stay
    held for the whole reply, however long the client takes to read it, even past
    store.lease_seconds and while puts evict everything else."""
    node = node_factory("store.lease_seconds=0.2", "disk.enabled=false")
    ns = Namespace(uuid.uuid4().hex, block_tokens=1)
    keys = block_keys(ns, list(range(8)))
    size = 48 << 20  # far more than the socket buffers hold
    blocks = [np.full(size, i + 1, dtype=np.uint8) for i in range(8)]
    with node.client(shared_memory=False) as client:
        assert client.put(keys[:1], blocks[:1])
        with raw_connect(node) as sock:
            sock.sendall(
                proto.encode_frame(Kind.REQUEST, Op.GET, 2, {"keys": [bytes(keys[0])]})
            )
            header = proto.FrameHeader.unpack(
                recv_exact(sock, proto.HEADER.size), 1 << 40
            )
            assert header.payload_bytes == size  # the reply is on its way
            # Let the read lease's time run out (the time is what is tested), then
            # evict everything evictable: the reply's block must stay put.
            time.sleep(0.3)
            for i in range(1, 8):  # 8 x 48 MiB through a 256 MiB arena
                client.put(keys[i : i + 1], blocks[i : i + 1])
            assert held_slots(node) == 1
            recv_exact(sock, header.body_bytes)
            payload = bytearray(size)
            view = memoryview(payload)
            while view:
                count = sock.recv_into(view)
                assert count
                view = view[count:]
            assert np.array_equal(np.frombuffer(payload, np.uint8), blocks[0])
    wait_until(lambda: held_slots(node) == 0, 10, "the reply's slot to be let go")


def test_a_tcp_reader_slower_than_transfer_timeout_is_cut_off(
    node_factory: Any,
) -> None:
    """It cannot hold blocks in the arena for longer than server.transfer_timeout."""
    node = node_factory("server.transfer_timeout=1", "disk.enabled=false")
    keys = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), [1])
    size = 48 << 20
    with node.client(shared_memory=False) as client:
        assert client.put(keys, [np.ones(size, dtype=np.uint8)])
    with raw_connect(node) as sock:
        sock.sendall(
            proto.encode_frame(Kind.REQUEST, Op.GET, 2, {"keys": [bytes(keys[0])]})
        )
        recv_exact(sock, proto.HEADER.size)  # the reply is on its way
        wait_until(lambda: held_slots(node) == 0, 10, "the node to give up")
        received = 0
        while chunk := sock.recv(1 << 20):  # what it sent before, then the end
            received += len(chunk)
        assert 0 < received < size
    assert "slower than server.transfer_timeout" in node.log_text()
    still_serving(node)


def put_frame(key: bytes, size: int) -> bytes:
    body = {"keys": [key], "sizes": [size], "chained": False}
    return proto.encode_frame(Kind.REQUEST, Op.PUT, 2, body, size)


def test_a_slow_tcp_writer_keeps_its_slots_past_the_reservation_timeout(
    node_factory: Any,
) -> None:
    """A TCP put's payload lands straight in reserved slots: the sweep must not hand
    them to other blocks while the bytes are still coming, however slowly."""
    node = node_factory(
        "store.reservation_timeout=0.2",
        "store.cleanup_interval=0.05",
        "disk.enabled=false",
    )
    keys = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), list(range(9)))
    size = 32 << 20
    blocks = [np.full(size, i + 1, dtype=np.uint8) for i in range(9)]
    with node.client(shared_memory=False) as client, raw_connect(node) as sock:
        sock.sendall(put_frame(bytes(keys[0]), size) + blocks[0][: size // 2].tobytes())
        # Let the reservation's time run out and the sweep pass over it (the time is
        # what is tested), then fill the arena with other blocks.
        time.sleep(0.5)
        for i in range(1, 9):  # 9 x 32 MiB through a 256 MiB arena
            client.put(keys[i : i + 1], blocks[i : i + 1])
        sock.sendall(blocks[0][size // 2 :].tobytes())
        kind, body = read_frame(sock)
        assert kind == Kind.REPLY and body["stored"] == [True]
        for i in range(9):
            got = client.get(keys[i : i + 1])
            if got:  # evicted ones are misses; what is there is right
                assert np.array_equal(got[0], blocks[i]), f"block {i}"
        assert client.get(keys[:1]), "the slow put's block was evicted at once"


def test_a_tcp_writer_slower_than_transfer_timeout_is_cut_off(
    node_factory: Any,
) -> None:
    """Its reservation is aborted, and nothing of it is stored."""
    node = node_factory("server.transfer_timeout=1", "disk.enabled=false")
    key = block_keys(Namespace(uuid.uuid4().hex, block_tokens=1), [1])[0]
    before = memory_used(node)
    with raw_connect(node) as sock:
        sock.sendall(put_frame(bytes(key), 8 << 20) + bytes(1 << 20))
        assert closed_by_peer(sock)  # no reply: the node hung up
    assert memory_used(node) == before
    assert "sent a put of 8388608 bytes slower than" in node.log_text()
    with node.client(shared_memory=False) as client:
        assert client.match([key]).num_blocks == 0
