"""Time to first token with the KV loaded from kvtier, on a GPU, at 4k-32k tokens.

    python benchmarks/gpu_ttft.py                 # CUDA: Llama-3-8B shape, bf16
    python benchmarks/gpu_ttft.py --smoke         # CPU: tiny shape, short prompts
    python benchmarks/gpu_ttft.py --json          # ends with one JSON object

Builds a Llama-3-8B-shaped model (32 layers, 8 KV heads of 128, bf16: 128 KiB of KV
per token) with random weights, and for each prompt length measures, in one run:

* prefill: a forward pass over the whole prompt (no cache);
* raw pinned bandwidth: one host->GPU copy of the prompt's KV bytes from page-locked
  memory (the floor of any load);
* load through kvtier: the prompt's stored blocks from an embedded store, whose arena
  is page-locked, into the GPU as a DynamicCache;
* TTFT with a full hit: load + a one-token forward;
* the floor: the raw pinned copy of the same bytes + the one-token forward.

Targets (checked and printed): load bandwidth >= 0.85x raw pinned; at the longest
prompt TTFT with a full hit >= 10x faster than prefill and within 1.25x of the floor.
Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from kvtier.bench.timing import median_time as _median_time
from kvtier.config import load_config
from kvtier.integrations.models import SHAPES, build_model
from kvtier.integrations.serving import serve
from kvtier.integrations.transformers import PrefixCache


def median_time(
    run: Callable[[], Any], repeats: int, sync: Callable[[], None]
) -> float:
    """Median seconds of ``run`` until the device has finished it too."""
    return _median_time(lambda: (run(), sync()), repeats, sync)


def raw_pinned_copy_s(
    nbytes: int, device: torch.device, repeats: int, sync: Any
) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    host.fill_(1)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return median_time(lambda: target.copy_(host, non_blocking=True), repeats, sync)


def one_token_forward_s(
    model: Any, kv: PrefixCache, ids: Any, repeats: int, sync: Any
) -> float:
    """A one-token forward over a cache of the rest of the prompt (loaded once)."""
    loaded = kv.load(ids)
    cache = loaded.cache
    prefix_len = cache.get_seq_length()

    def step() -> None:
        with torch.inference_mode():
            model(ids[:, prefix_len:], past_key_values=cache, use_cache=True)
        cache.crop(prefix_len - cache.get_seq_length())  # drop the token again

    return median_time(step, repeats, sync)


def bench_prompt(
    model: Any, kv: PrefixCache, tokens: int, repeats: int, device: Any
) -> dict[str, float]:
    sync = (
        (lambda: torch.cuda.synchronize(device))
        if device.type == "cuda"
        else (lambda: None)
    )
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    prefill_s = median_time(lambda: serve(model, ids, None, 1), repeats, sync)
    serve(model, ids, kv, 1)  # stores every whole block
    kv_bytes = (tokens - 1) * kv.layout.block_bytes // kv.layout.block_tokens
    raw_s = raw_pinned_copy_s(kv_bytes, device, repeats, sync)
    load_s = median_time(lambda: kv.load(ids), repeats, sync)
    ttft_s = statistics.median(
        serve(model, ids, kv, 1, store=False).ttft_s for _ in range(repeats)
    )
    forward_s = one_token_forward_s(model, kv, ids, repeats, sync)
    floor_s = raw_s + forward_s
    return {
        f"prefill_{tokens}_s": prefill_s,
        f"raw_pinned_{tokens}_bytes_per_s": kv_bytes / raw_s,
        f"load_{tokens}_bytes_per_s": kv_bytes / load_s,
        f"load_vs_raw_{tokens}_ratio": raw_s / load_s,
        f"ttft_hit_{tokens}_s": ttft_s,
        f"floor_{tokens}_s": floor_s,
        f"prefill_vs_ttft_{tokens}_ratio": prefill_s / ttft_s,
        f"ttft_vs_floor_{tokens}_ratio": ttft_s / floor_s,
    }


def check_targets(results: dict[str, float], lengths: list[int]) -> list[str]:
    longest = max(lengths)
    checks = [(f"load_vs_raw_{n}_ratio", ">=", 0.85) for n in lengths] + [
        (f"prefill_vs_ttft_{longest}_ratio", ">=", 10.0),
        (f"ttft_vs_floor_{longest}_ratio", "<=", 1.25),
    ]
    lines = []
    for key, op, target in checks:
        value = results[key]
        ok = value >= target if op == ">=" else value <= target
        lines.append(
            f"{'ok  ' if ok else 'MISS'} {key} = {value:.3f} (target {op} {target})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shape, short prompts"
    )
    parser.add_argument("--tokens", type=int, nargs="+", help="prompt lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    shape = SHAPES["llama3-8b"] if cuda else SHAPES["tiny"]
    lengths = args.tokens or ([4096, 16384, 32768] if cuda else [256, 512])
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model("llama", shape, dtype=dtype, device=device)
    layout_bytes = 2 * shape.num_hidden_layers * shape.num_key_value_heads * 128 * 2
    capacity = max(lengths) * (layout_bytes if cuda else 4096) * 2 + (1 << 30)
    with tempfile.TemporaryDirectory() as scratch:
        config = load_config(
            overrides={
                "store.data_dir": scratch,
                "memory.capacity_bytes": capacity,
                "disk.enabled": False,
                "memory.huge_pages": True,
            }
        )
        results: dict[str, float] = {}
        with PrefixCache(model, config=config) as kv:
            for tokens in lengths:
                print(f"{tokens} tokens ...", file=sys.stderr)
                results.update(bench_prompt(model, kv, tokens, args.repeats, device))
    print(
        f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu (smoke test)'}"
    )
    for key, value in results.items():
        shown = (
            f"{value / 1e9:.2f} GB/s"
            if key.endswith("_bytes_per_s")
            else f"{value:.4f}"
        )
        print(f"{key:36s} {shown}")
    for line in check_targets(results, lengths):
        print(line)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
