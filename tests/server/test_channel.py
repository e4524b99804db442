"""Channel I/O on the calling thread (the blocking client's path), on real sockets."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kvtier._sockio import Channel, scratch_views
from kvtier.errors import ConnectionLostError

MiB = 1 << 20


def pair() -> tuple[Channel, socket.socket]:
    mine, theirs = socket.socketpair()
    return Channel(sock=mine), theirs


def test_send_now_gathers_buffers_larger_than_the_socket_takes() -> None:
    channel, peer = pair()
    parts = [
        np.random.default_rng(i).integers(0, 256, n, np.uint8)
        for i, n in enumerate((7, 9 * MiB, 0, 3 * MiB + 5))
    ]
    total = sum(p.nbytes for p in parts)
    got = bytearray(total)

    def read() -> None:
        view = memoryview(got)
        while view:
            view = view[peer.recv_into(view) :]

    reader = threading.Thread(target=read)
    reader.start()
    channel.send_now(parts, time.monotonic() + 30)
    reader.join(30)
    assert not reader.is_alive()
    assert bytes(got) == b"".join(p.tobytes() for p in parts)
    channel.close()
    peer.close()


def test_recv_into_now_fills_exactly_across_partial_reads() -> None:
    channel, peer = pair()
    data = np.random.default_rng(1).integers(0, 256, 6 * MiB, np.uint8)
    writer = threading.Thread(target=peer.sendall, args=(data.tobytes() + b"next",))
    writer.start()
    out = np.zeros(6 * MiB, np.uint8)
    channel.recv_into_now(out, time.monotonic() + 30)
    rest = bytearray(4)
    channel.recv_into_now(rest, None)
    writer.join(30)
    assert np.array_equal(out, data) and rest == b"next"
    channel.close()
    peer.close()


def test_a_silent_peer_is_a_timeout_and_a_closed_one_a_lost_connection() -> None:
    channel, peer = pair()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        channel.recv_into_now(bytearray(1), started + 0.05)
    assert time.monotonic() - started >= 0.05
    peer.sendall(b"ab")
    peer.close()
    buf = bytearray(4)
    with pytest.raises(ConnectionLostError, match="closed"):
        channel.recv_into_now(buf, time.monotonic() + 5)
    assert buf[:2] == b"ab"  # what came before the close was kept
    with pytest.raises(ConnectionLostError):
        channel.send_now([b"x" * MiB] * 4, time.monotonic() + 5)
    channel.close()


def test_a_send_the_peer_never_reads_times_out() -> None:
    channel, peer = pair()
    with pytest.raises(TimeoutError):
        channel.send_now([bytes(64 * MiB)], time.monotonic() + 0.1)
    channel.close()
    peer.close()


def test_scratch_views_cover_exactly_the_bytes_to_drop() -> None:
    sizes = [len(v) for v in scratch_views(2 * MiB + 3)]
    assert sizes == [MiB, MiB, 3]
    assert list(scratch_views(0)) == []
