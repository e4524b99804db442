"""What every benchmark times with: medians of repeated runs, a subject run
alternately with its baseline, and free loopback ports for the processes it starts."""

from __future__ import annotations

import collections
import socket
import statistics
import time
from collections.abc import Callable

__all__ = ["free_port", "median_time", "paired"]


def _nothing() -> None:
    pass


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(
    fn: Callable[[], object],
    repeats: int,
    setup: Callable[[], object] = _nothing,
) -> float:
    """The median wall time of ``fn`` over ``repeats`` runs; ``setup`` runs untimed
    before each."""
    times = []
    for _ in range(repeats):
        setup()
        times.append(_timed(fn))
    return statistics.median(times)


def paired(
    baseline: Callable[[], object],
    subject: Callable[[], object],
    repeats: int,
    baseline_setup: Callable[[], object] = _nothing,
    subject_setup: Callable[[], object] = _nothing,
) -> tuple[float, float]:
    """Median times of a baseline and a subject, run alternately (each after its own
    untimed setup) so both see the same machine, a shared and noisy one, over the same
    stretch of time."""
    base_times: list[float] = []
    subject_times: list[float] = []
    for _ in range(repeats):
        baseline_setup()
        base_times.append(_timed(baseline))
        subject_setup()
        subject_times.append(_timed(subject))
    return statistics.median(base_times), statistics.median(subject_times)


_GIVEN_PORTS: collections.deque[int] = collections.deque(maxlen=1024)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the caller's process binds it next), and
    none of the last ones given: the kernel may hand the same free port out again
    before whoever got it binds it (an etcd cluster once got one peer port twice)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.append(port)
            return port
