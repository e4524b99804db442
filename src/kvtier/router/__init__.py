"""KV-cache-aware routing: engine KV events -> global index -> the pod for a prompt.

Needs the ``router`` extra (aiohttp, pyzmq, prometheus_client). The layers, bottom up:

    events.py      vLLM's KV event batches, decoded (map and array forms)
    chains.py      one pod's engine blocks folded into kvtier block keys
    index.py       block key -> pods holding it, with tier (one bitmask per key)
    scorer.py      leading blocks per pod, weighted by tier and store, less load
    feed.py        one pod's sequence numbers: in order, gap, restart, duplicate
    router.py      pods, index and the route call (one asyncio loop, no locks)
    store_view.py  the shared kvtier store's prefix match (embedded or HTTP)
    ingest.py      ZMQ subscribers, per-pod workers, replay, expiry
    http.py        the HTTP API (openapi.json beside it)
    service.py     ``kvtier route``
    cli.py         the ``route`` and ``bench route`` commands

This package imports nothing heavy at import time, so ``kvtier --help`` stays fast and
works without the extra; import the submodules.
"""
