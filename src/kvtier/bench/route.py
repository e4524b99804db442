"""``kvtier bench route``: event ingestion, route latency and index memory.

Figures, each the median of ``repeats`` runs:

* engine block events (one per hash in a BlockStored or BlockRemoved) ingested per
  second on one core: msgpack decode, chains, index, from pre-encoded payloads of a
  synthetic workload (shared system prompts, varied suffixes, a bounded cache per pod
  that evicts its oldest requests), in vLLM's map form with 64-bit int hashes;
* the same through ZMQ, from a publisher in another process to a running service;
* route latency p50 / p99 for a 32k-token prompt (a list of ints, as JSON brings it)
  over 64 pods whose index holds ``index_blocks`` (pod, kvtier block) entries in all,
  in-process (wall time, and the thread's CPU time, which a busy machine's
  preemption does not inflate) and through HTTP. The index is filled directly: a
  route reads only the global index, so how the entries got there does not change
  its cost;
* memory (tracemalloc): of the global index per million (pod, kvtier block) entries,
  and of a pod's whole state (engine blocks, chains, keys) per million engine blocks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import numpy as np
import zmq
import zmq.asyncio
from aiohttp import web

from kvtier.config import Config, RouterConfig, RouterPodConfig
from kvtier.core.keys import BlockKey
from kvtier.router.events import decode_batch
from kvtier.router.http import make_app
from kvtier.router.ingest import Ingest
from kvtier.router.router import Router, RouteRequest
from kvtier.router.service import RouterService

__all__ = ["RouteBenchConfig", "run_route_bench"]

MODEL = "bench/model"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class RouteBenchConfig:
    """Sizes of ``kvtier bench route`` (``--quick`` shrinks them)."""

    ingest_blocks: int = 1_000_000
    index_blocks: int = 1_000_000
    num_pods: int = 64
    prompt_tokens: int = 32_768
    route_calls: int = 2_000
    repeats: int = 5

    @classmethod
    def quick(cls) -> RouteBenchConfig:
        return cls(
            ingest_blocks=200_000, index_blocks=200_000, route_calls=500, repeats=3
        )


def run_route_bench(cfg: RouteBenchConfig, progress: Progress) -> dict[str, float]:
    """Runs every measurement; returns the figures keyed as ``--json`` prints them."""
    results: dict[str, float] = {}
    progress(f"workload of {cfg.ingest_blocks:,} engine block events")
    payloads, num_events = _workload(cfg.ingest_blocks, seed=1)
    progress("ingest, in-process")
    results["ingest_blocks_per_s"] = _median(
        [num_events / _ingest_seconds(payloads) for _ in range(cfg.repeats)]
    )
    progress("ingest through ZMQ from a publisher process")
    results["ingest_zmq_blocks_per_s"] = _median(
        [
            num_events / _zmq_ingest_seconds(cfg.ingest_blocks)
            for _ in range(cfg.repeats)
        ]
    )
    progress("memory of a pod's state per engine block")
    results["ingest_bytes_per_million_engine_blocks"] = _ingest_memory(payloads)
    del payloads
    progress(f"route latency: {cfg.num_pods} pods, {cfg.index_blocks:,} indexed blocks")
    results.update(asyncio.run(_route_latency(cfg)))
    progress("memory of the global index")
    results["index_bytes_per_million_blocks"] = _index_memory(cfg)
    return results


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# --- the synthetic workload -------------------------------------------------------

_BLOCK = 16
_SYSTEM_PROMPTS = 8
_SYSTEM_BLOCKS = 64
_POD_CAPACITY_BLOCKS = 16_384
_REQUESTS_PER_BATCH = 4


def _workload(num_events: int, seed: int) -> tuple[list[bytes], int]:
    """One pod's payloads: requests reuse system prompts and store their suffix;
    past its capacity the pod removes its oldest requests' blocks."""
    rng = np.random.default_rng(seed)
    systems = [_new_blocks(rng, _SYSTEM_BLOCKS) for _ in range(_SYSTEM_PROMPTS)]
    held_systems: set[int] = set()
    fifo: list[list[int]] = []
    held = count = 0
    payloads: list[bytes] = []
    while count < num_events:
        events: list[dict[str, Any]] = []
        for _ in range(_REQUESTS_PER_BATCH):
            system = int(rng.integers(_SYSTEM_PROMPTS))
            if system not in held_systems:
                held_systems.add(system)
                events.append(_stored(*systems[system], None))
                held += _SYSTEM_BLOCKS
            hashes, tokens = _new_blocks(rng, int(rng.integers(16, 128)))
            events.append(_stored(hashes, tokens, systems[system][0][-1]))
            fifo.append(hashes)
            held += len(hashes)
            while held > _POD_CAPACITY_BLOCKS:
                gone = fifo.pop(0)
                events.append(
                    {"type": "BlockRemoved", "block_hashes": gone, "medium": "GPU"}
                )
                held -= len(gone)
        count += sum(len(e["block_hashes"]) for e in events)
        payloads.append(msgpack.packb([time.time(), events, 0]))
    return payloads, count


def _new_blocks(rng: np.random.Generator, num: int) -> tuple[list[int], list[int]]:
    hashes = rng.integers(0, 2**63, size=num, dtype=np.int64).tolist()
    tokens = rng.integers(0, 128_000, size=num * _BLOCK).tolist()
    return hashes, tokens


def _stored(hashes: list[int], tokens: list[int], parent: int | None) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": _BLOCK,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }


def _router(num_pods: int = 1, **kwargs: Any) -> Router:
    router = Router(RouterConfig(**kwargs))
    for i in range(num_pods):
        router.add_pod(f"pod-{i:02}", RouterPodConfig(model=MODEL))
    return router


# --- ingestion ----------------------------------------------------------------------


def _ingest_seconds(payloads: list[bytes]) -> float:
    router = _router()
    pod = router.pods["pod-00"]
    started = time.perf_counter()
    for seq, payload in enumerate(payloads):
        router.apply(pod, seq, decode_batch(payload))
    return time.perf_counter() - started


def _ingest_memory(payloads: list[bytes]) -> float:
    router = _router()
    pod = router.pods["pod-00"]
    decoded = [decode_batch(p) for p in payloads]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for seq, batch in enumerate(decoded):
        router.apply(pod, seq, batch)
    del decoded
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / max(pod.chains.num_blocks, 1) * 1e6


def _zmq_ingest_seconds(num_events: int) -> float:
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    publisher = spawn.Process(target=_publish, args=(child, num_events), daemon=True)
    publisher.start()
    try:
        endpoint, num_payloads = parent.recv()
        return asyncio.run(_receive(endpoint, num_payloads, parent))
    finally:
        publisher.join(30)


def _publish(conn: Any, num_events: int) -> None:
    """The publisher process: vLLM's PUB side, on its own core."""
    payloads, _ = _workload(num_events, seed=1)
    context = zmq.Context()
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind("tcp://127.0.0.1:*")
    conn.send((pub.getsockopt_string(zmq.LAST_ENDPOINT), len(payloads)))
    pub.recv()  # the router subscribed
    for seq, payload in enumerate(payloads):
        pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
    conn.recv()  # the router has it all
    pub.close(linger=0)
    context.term()


async def _receive(endpoint: str, num_payloads: int, conn: Any) -> float:
    config = Config().replace(
        {
            "router.listen": "127.0.0.1:0",
            "router.pods": {"p": {"model": MODEL, "endpoint": endpoint}},
            "router.silence_seconds": 0,
        }
    )
    service = RouterService(config)
    await service.start()
    try:
        while service.ingest.processed("p") == 0:
            await asyncio.sleep(0.0005)
        started = time.perf_counter()
        while service.ingest.processed("p") < num_payloads:
            await asyncio.sleep(0.0005)
        elapsed = time.perf_counter() - started
        pod = service.router.pods["p"]
        assert pod.counters.batches == num_payloads and not pod.counters.resyncs, (
            "the publisher's batches did not all arrive in order"
        )
        return elapsed
    finally:
        conn.send("done")
        await service.stop()


# --- routing ------------------------------------------------------------------------


def _filled_router(cfg: RouteBenchConfig) -> tuple[Router, list[int]]:
    """64 pods holding prefixes of one prompt, of many lengths, in GPU or CPU, plus
    unrelated blocks up to ``index_blocks`` entries in all."""
    router = _router(cfg.num_pods, silence_seconds=0)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 128_000, size=cfg.prompt_tokens).tolist()
    keys = list(router.keys(RouteRequest(MODEL, token_ids=tokens)))
    per_pod = cfg.index_blocks // cfg.num_pods
    for i, pod in enumerate(router.pods.values()):
        run = (i * 2) % (len(keys) + 1)
        for key in keys[:run]:
            router.index.credit(pod.slot, key, 1 if i % 3 == 2 else 0)
        filler = rng.bytes(16 * max(per_pod - run, 0))
        for start in range(0, len(filler), 16):
            router.index.credit(pod.slot, BlockKey(filler[start : start + 16]), 0)
    return router, tokens


async def _route_latency(cfg: RouteBenchConfig) -> dict[str, float]:
    router, tokens = _filled_router(cfg)
    request = RouteRequest(MODEL, token_ids=tokens)
    runs, cpu_runs = [], []
    for _ in range(cfg.repeats):
        times, cpu_times = [], []
        for _ in range(cfg.route_calls):
            started, cpu_started = time.perf_counter(), time.thread_time()
            await router.route(request)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.thread_time() - cpu_started)
        runs.append(_percentiles(times))
        cpu_runs.append(_percentiles(cpu_times))
    # CPU time of the routing thread beside wall time: on a shared machine the gap
    # is time the thread spent preempted, not time the route needed.
    results = {
        "route_p50_ms": _median([r[0] for r in runs]),
        "route_p99_ms": _median([r[1] for r in runs]),
        "route_cpu_p50_ms": _median([r[0] for r in cpu_runs]),
        "route_cpu_p99_ms": _median([r[1] for r in cpu_runs]),
    }
    packed = base64.b64encode(np.asarray(tokens, "<u4").tobytes()).decode()
    for name, field, value in (
        ("http", "token_ids", tokens),
        ("http_b64", "token_ids_b64", packed),
    ):
        body = json.dumps({"model": MODEL, field: value, "top_k": 8}).encode()
        http = [
            await _http_latency(router, body, cfg.route_calls // 4)
            for _ in range(cfg.repeats)
        ]
        results[f"route_{name}_p50_ms"] = _median([r[0] for r in http])
        results[f"route_{name}_p99_ms"] = _median([r[1] for r in http])
    return results


def _percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


async def _http_latency(router: Router, body: bytes, calls: int) -> tuple[float, float]:
    """Client and server share this loop; the body is encoded once, as a proxy in
    another process would have done."""
    context = zmq.asyncio.Context()
    runner = web.AppRunner(make_app(router, Ingest(router, context)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/route"
    headers = {"Content-Type": "application/json"}
    times = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(calls):
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                times.append(time.perf_counter() - started)
    finally:
        await runner.cleanup()
        context.term()
    return _percentiles(times)


def _index_memory(cfg: RouteBenchConfig) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    router, _ = _filled_router(cfg)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / max(router.index.num_entries(), 1) * 1e6
