"""A live ``kvtier route`` in-process, and vLLM-like publishers, for service tests.

The router runs on its own thread's event loop with HTTP on a free port; tests talk
to it over HTTP like any client. Publishers are real ZMQ sockets sending vLLM's wire
format. A publisher binds an XPUB socket, which is a PUB that also reports
subscriptions, so a test knows when the router has joined instead of sleeping; its
optional ROUTER socket answers replay requests from a buffer the way vLLM's does.
Waiting is always on observable state, with a deadline that fails the test.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from tests.router import vllm

from kvtier.config import Config
from kvtier.router.service import RouterService

DEADLINE_S = 10.0
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class LiveRouter:
    """``RouterService`` on a background event loop."""

    def __init__(self, config: Config) -> None:
        self.service = RouterService(config)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(DEADLINE_S) or self._error is not None:
            raise RuntimeError(f"router did not start: {self._error!r}")
        self.url = f"http://127.0.0.1:{self.service.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.service.start())
        except BaseException as exc:  # surfaced by __init__
            self._error = exc
        self._started.set()
        self._loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.service.stop(), self._loop).result(
            DEADLINE_S
        )
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEADLINE_S)
        self._loop.close()

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=DEADLINE_S) as response:
                return response.status, _decode(response.read(), response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read(), exc.headers)

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def pod(self, pod_id: str) -> dict[str, Any]:
        pod: dict[str, Any] = self.get(f"/v1/pods/{pod_id}")
        return pod

    def route(self, model: str, token_ids: Sequence[int], **extra: Any) -> Any:
        status, body = self.request(
            "POST", "/v1/route", {"model": model, "token_ids": list(token_ids), **extra}
        )
        assert status == 200, body
        return body

    def ranking(self, model: str, token_ids: Sequence[int]) -> list[tuple[str, int]]:
        """(pod, prefix_blocks) best first."""
        return [
            (p["pod"], p["prefix_blocks"]) for p in self.route(model, token_ids)["pods"]
        ]

    def wait_pod(self, pod_id: str, condition: Callable[[dict[str, Any]], bool]) -> Any:
        """Polls the pod until it exists and ``condition`` holds; fails the test at
        the deadline."""

        def probe() -> Any:
            status, body = self.request("GET", f"/v1/pods/{pod_id}")
            return body if status == 200 else None

        return wait(probe, lambda pod: pod is not None and condition(pod), pod_id)


def wait(probe: Callable[[], Any], condition: Callable[[Any], bool], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        state = probe()
        if condition(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on {what}; last state: {state}")
        time.sleep(0.005)  # a poll interval, not a stand-in for synchronization


def _decode(raw: bytes, headers: Any) -> Any:
    if "json" in headers.get("Content-Type", ""):
        return json.loads(raw)
    return raw.decode()


class Publisher:
    """A vLLM engine's ZMQ event publisher (and replay socket), minus the engine."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        *,
        topic: str = "",
        replay: bool = False,
        connect: str | None = None,
    ) -> None:
        self.topic = topic.encode()
        self.pub = context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if connect:
            self.pub.connect(connect)
            self.endpoint = connect
        else:
            self.pub.bind("tcp://127.0.0.1:*")
            self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seq = 0
        self.ts = 1_000.0
        self.buffer: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self.replay_endpoint = ""
        self.replay_requests: list[int] = []
        if replay:
            self._start_replay(context)

    def wait_subscribed(self) -> None:
        """Returns once a subscriber has joined (XPUB reports it)."""
        if not self.pub.poll(int(DEADLINE_S * 1000)):
            raise AssertionError("no subscriber joined the publisher")
        message = self.pub.recv()
        assert message[:1] == b"\x01", message

    def send(
        self, events: Sequence[Any], *, form: vllm.Form = "map", lost: bool = False
    ) -> int:
        """Publishes one batch with the next number; ``lost`` keeps it off the wire
        (it stays in the replay buffer, as a batch ZMQ dropped would)."""
        self.ts += 1.0
        payload = vllm.batch(events, ts=self.ts, form=form)
        seq = self.seq
        self.seq += 1
        with self._lock:
            self.buffer.append((seq, payload))
        if not lost:
            self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def send_raw(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    def restart(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        """The engine process exits and starts over on the same endpoint: numbers
        from 0, an empty replay buffer; returns once the router is back."""
        self.pub.close()
        self.pub = context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        wait(self._rebind, bool, f"the port of {self.endpoint} to be free")
        self.seq = 0
        with self._lock:
            self.buffer.clear()
        self.wait_subscribed()

    def _rebind(self) -> bool:
        """ZMQ closes a listening socket in its I/O thread, a moment after close()."""
        try:
            self.pub.bind(self.endpoint)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE:
                raise
            return False
        return True

    def _start_replay(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self._replay = context.socket(zmq.ROUTER)
        self._replay.setsockopt(zmq.LINGER, 0)
        self._replay.bind("tcp://127.0.0.1:*")
        self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_replay, daemon=True)
        self._thread.start()

    def _serve_replay(self) -> None:
        while not self._stop.is_set():
            if not self._replay.poll(20):
                continue
            client, empty, start_bytes = self._replay.recv_multipart()
            start = int.from_bytes(start_bytes, "big")
            self.replay_requests.append(start)
            with self._lock:
                frames = [(s, p) for s, p in self.buffer if s >= start]
            for seq, payload in frames:
                self._replay.send_multipart(
                    [client, b"", seq.to_bytes(8, "big"), payload]
                )
            self._replay.send_multipart([client, b"", END_SEQ, b""])

    def close(self) -> None:
        if self.replay_endpoint:
            self._stop.set()
            self._thread.join(DEADLINE_S)
            self._replay.close()
        self.pub.close()
