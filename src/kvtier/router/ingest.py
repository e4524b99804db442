"""Engine KV events over ZMQ, into the router: one ordered stream per pod.

Two ways in, both vLLM's:

* the router connects a SUB socket to each pod's publisher (``endpoint``), the
  default vLLM setup (``"endpoint": "tcp://*:5557"`` binds on the pod);
* pods connect to one SUB socket the router binds (``router.bind_endpoint``) and name
  themselves in the topic, ``kv@<pod>@<model>`` (llm-d's convention); a pod heard
  there for the first time is added.

Each pod has a queue and a worker task, so a pod's batches are applied one at a time
in arrival order while a slow replay of one pod holds up no other. The worker asks
the pod's :class:`~kvtier.router.feed.Feed` what each batch is and, after a gap, a
restart or on first contact, asks the pod's replay socket (vLLM's ROUTER
``replay_endpoint``) for what it missed: it sends the first wanted sequence number
as 8 big-endian bytes and reads ``(b"", seq, payload)`` frames (a topic frame before
``seq`` is accepted too) until ``seq`` is -1. Replayed batches go through the same
classification, without a further replay, so a replay that starts after the first
missing batch (the pod's buffer rolled over) still drops the pod's index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from kvtier.config import RouterPodConfig
from kvtier.errors import ConfigError, EventFormatError
from kvtier.router.events import EventBatch, decode_batch
from kvtier.router.feed import Verdict
from kvtier.router.router import Pod, Router

__all__ = ["Ingest"]

log = logging.getLogger(__name__)

_QUEUE_FRAMES = 10_000
_RCVHWM = 100_000  # vLLM's publisher keeps 100k batches (hwm) on its side too
_END_SEQ = (-1).to_bytes(8, "big", signed=True)

Frames = list[bytes]
_DISCONNECTED = None  # queued when the connection to a pod's publisher drops


@dataclass
class _Stream:
    queue: asyncio.Queue[Frames | None] = field(
        default_factory=lambda: asyncio.Queue(_QUEUE_FRAMES)
    )
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    processed: int = 0


class Ingest:
    """Subscribes to pods' events and feeds them to the router, in order.

    Args:
        router: The router whose pods are followed.
        context: The asyncio ZMQ context sockets are made in.
    """

    def __init__(self, router: Router, context: zmq.asyncio.Context) -> None:
        self._router = router
        self._context = context
        self._streams: dict[str, _Stream] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.bound_endpoint = ""

    def start(self) -> None:
        """Follows the configured pods, binds ``bind_endpoint``, starts expiry.

        Raises:
            ConfigError: ``bind_endpoint`` cannot be bound.
        """
        config = self._router.config
        if config.bind_endpoint:
            self._tasks.append(asyncio.create_task(self._bound(self._bind())))
        for pod_id, pod_config in config.pods.items():
            self.follow(self._router.add_pod(pod_id, pod_config))
        if config.silence_seconds:
            self._tasks.append(asyncio.create_task(self._expiry()))

    def follow(self, pod: Pod) -> None:
        """Starts the pod's worker, and its subscriber when it has an endpoint."""
        stream = self._streams[pod.pod_id] = _Stream()
        stream.tasks.append(asyncio.create_task(self._work(pod, stream)))
        if pod.config.endpoint:
            stream.tasks.append(asyncio.create_task(self._subscribe(pod, stream)))

    async def unfollow(self, pod_id: str) -> None:
        """Stops the pod's tasks (the router forgets the pod separately)."""
        stream = self._streams.pop(pod_id, None)
        if stream is not None:
            await _cancel(stream.tasks)

    def processed(self, pod_id: str) -> int:
        """Messages of the pod handled so far (applied, skipped or dropped)."""
        stream = self._streams.get(pod_id)
        return stream.processed if stream else 0

    async def close(self) -> None:
        for pod_id in list(self._streams):
            await self.unfollow(pod_id)
        await _cancel(self._tasks)

    async def _subscribe(self, pod: Pod, stream: _Stream) -> None:
        with self._socket(zmq.SUB) as sock:
            sock.setsockopt(zmq.RCVHWM, _RCVHWM)
            sock.setsockopt(zmq.SUBSCRIBE, pod.config.topic.encode())
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            watcher = asyncio.create_task(self._watch(monitor, stream))
            sock.connect(pod.config.endpoint)
            try:
                while True:
                    await stream.queue.put(await sock.recv_multipart())
            finally:
                await _cancel([watcher])
                sock.disable_monitor()
                monitor.close(linger=0)

    async def _watch(self, monitor: zmq.asyncio.Socket, stream: _Stream) -> None:
        """A dropped connection means the engine exited or the network broke: either
        way what it holds now is unknown, so the worker drops its index (and replays,
        when the pod offers it, on the next batch)."""
        while True:
            await monitor.recv_multipart()
            await stream.queue.put(_DISCONNECTED)

    def _bind(self) -> zmq.asyncio.Socket:
        endpoint = self._router.config.bind_endpoint
        sock = self._context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, _RCVHWM)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise ConfigError(
                f"router.bind_endpoint: cannot bind {endpoint}: {exc}"
            ) from exc
        self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    async def _bound(self, sock: zmq.asyncio.Socket) -> None:
        with contextlib.closing(sock):
            while True:
                frames = await sock.recv_multipart()
                stream = self._stream_for_topic(frames[0])
                if stream is not None:
                    await stream.queue.put(frames)

    def _stream_for_topic(self, topic: bytes) -> _Stream | None:
        """The stream of the pod a ``kv@<pod>@<model>`` topic names, added if new."""
        parts = topic.decode(errors="replace").split("@", 2)
        if len(parts) != 3 or parts[0] != "kv" or not parts[1] or not parts[2]:
            log.warning("ignoring a batch with topic %r (not kv@<pod>@<model>)", topic)
            return None
        pod_id, model = parts[1], parts[2]
        if pod_id not in self._router.pods:
            try:
                self.follow(self._router.add_pod(pod_id, RouterPodConfig(model=model)))
            except ConfigError as exc:
                log.warning("ignoring topic %r: %s", topic, exc)
                return None
        return self._streams.get(pod_id)

    async def _work(self, pod: Pod, stream: _Stream) -> None:
        while True:
            frames = await stream.queue.get()
            try:
                if frames is _DISCONNECTED:
                    self._router.resync(pod, "disconnect")
                else:
                    await self._handle(pod, frames)
            except Exception:  # one bad batch must not end a pod's ingestion
                log.exception("pod %s: failed to apply a batch", pod.pod_id)
                self._router.resync(pod, "error")
            stream.processed += 1

    async def _handle(self, pod: Pod, frames: Frames) -> None:
        """A live message: classified, replayed around when that helps, applied."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self._router.resync(pod, "malformed")
            return
        seq = int.from_bytes(frames[1], "big")
        batch = self._decode(pod, seq, frames[2])
        if batch is None:
            return
        verdict = self._classify(pod, seq, batch)
        start = pod.feed.expected or 0
        if (
            verdict is not Verdict.APPLY
            and start < seq
            and await self._replay(pod, start)
        ):
            verdict = pod.feed.classify(seq, batch.ts)
        self._settle(pod, seq, batch, verdict)

    def _replayed(self, pod: Pod, seq: int, payload: bytes) -> None:
        """A replayed message: the same rules, but no replay of its own."""
        batch = self._decode(pod, seq, payload)
        if batch is not None:
            self._settle(pod, seq, batch, self._classify(pod, seq, batch))

    def _decode(self, pod: Pod, seq: int, payload: bytes) -> EventBatch | None:
        try:
            batch = decode_batch(payload)
        except EventFormatError as exc:
            log.warning("pod %s: batch %d does not decode: %s", pod.pod_id, seq, exc)
            self._router.resync(pod, "malformed")
            return None
        self._router.heard(pod)
        return batch

    def _classify(self, pod: Pod, seq: int, batch: EventBatch) -> Verdict:
        verdict = pod.feed.classify(seq, batch.ts)
        if verdict is not Verdict.APPLY:
            pod.counters.count(pod.counters.verdicts, verdict.value)
        if verdict is Verdict.RESTART:
            self._router.resync(pod, "restart")  # the position resets: next is FIRST
        return verdict

    def _settle(self, pod: Pod, seq: int, batch: EventBatch, verdict: Verdict) -> None:
        if verdict is Verdict.DUPLICATE:
            return
        if verdict is Verdict.GAP:
            self._router.resync(pod, "gap")
        self._router.apply(pod, seq, batch)

    async def _replay(self, pod: Pod, start: int) -> bool:
        """Fetches and applies the pod's batches from ``start``; False when none
        came (no replay socket, or it did not answer in time)."""
        if not pod.config.replay_endpoint:
            return False
        pod.state = "replaying"
        try:
            replayed = await self._fetch(pod, start)
        finally:
            pod.state = "live"
        for seq, payload in replayed:
            self._replayed(pod, seq, payload)
        return bool(replayed)

    async def _fetch(self, pod: Pod, start: int) -> list[tuple[int, bytes]]:
        timeout = self._router.config.replay_timeout_seconds
        replayed: list[tuple[int, bytes]] = []
        with self._socket(zmq.DEALER) as sock:
            sock.connect(pod.config.replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            try:
                async with asyncio.timeout(timeout):
                    while (item := _replayed(await sock.recv_multipart())) is not None:
                        replayed.extend(item)
                outcome = "complete"
            except TimeoutError:
                outcome = "timeout"
        pod.counters.count(pod.counters.replays, outcome)
        log.info(
            "pod %s: replay from %d: %d batches, %s",
            pod.pod_id,
            start,
            len(replayed),
            outcome,
        )
        return replayed

    async def _expiry(self) -> None:
        period = min(self._router.config.silence_seconds / 4, 1.0)
        while True:
            await asyncio.sleep(period)
            for pod_id in self._router.expire():
                log.info(
                    "pod %s expired after %.1f s of silence",
                    pod_id,
                    self._router.config.silence_seconds,
                )

    @contextlib.contextmanager
    def _socket(self, kind: int) -> Iterator[zmq.asyncio.Socket]:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            yield sock
        finally:
            sock.close()


def _replayed(frames: Frames) -> list[tuple[int, bytes]] | None:
    """One replay answer: [] to skip, None at the end marker."""
    if len(frames) == 4:
        frames = [frames[0], *frames[2:]]  # a topic frame before seq
    if len(frames) != 3 or frames[0] != b"" or len(frames[1]) != 8:
        log.warning("ignoring a malformed replay frame: %r", frames[:3])
        return []
    if frames[1] == _END_SEQ:
        return None
    return [(int.from_bytes(frames[1], "big"), frames[2])]


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()
