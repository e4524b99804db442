"""Raw frames of kvtier's protocol, for tests that speak it by hand (bad input,
authentication, limits)."""

from __future__ import annotations

import socket
from typing import Any

import msgpack

from kvtier import protocol as proto
from kvtier.protocol import Kind, Op


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """(kind, body) of the next frame; its payload is read and dropped."""
    header = recv_exact(sock, proto.HEADER.size)
    _magic, _v, kind, _op, _f, _rid, body_len, payload = proto.HEADER.unpack(header)
    body = msgpack.unpackb(recv_exact(sock, body_len)) if body_len else {}
    recv_exact(sock, payload)
    return kind, body


def hello(sock: socket.socket, token: str | None) -> tuple[int, dict[str, Any]]:
    sock.sendall(
        proto.encode_frame(
            Kind.REQUEST, Op.HELLO, 1, {"version": 1, "token": token or ""}
        )
    )
    return read_frame(sock)


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
