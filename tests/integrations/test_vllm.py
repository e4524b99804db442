"""KVTierConnector inside a real vLLM 0.33 Scheduler, and its worker half on CPU pages.

Needs vLLM installed without its CUDA stack (``.ci/run`` does it in a venv); marked
``vllm``, so the default run leaves it out. The worker's pages are built with vLLM's
own ``create_kv_cache_views`` in every physical layout it can hand out.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvhelpers import store_settings

pytestmark = pytest.mark.vllm

torch = pytest.importorskip("torch")

# vLLM's import chain trips deprecation warnings of torch and others (errors here).
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    vllm = pytest.importorskip("vllm")

    from vllm.config import (  # noqa: E402
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole  # noqa: E402
    from vllm.sampling_params import SamplingParams  # noqa: E402
    from vllm.utils.hashing import sha256  # noqa: E402
    from vllm.v1.core.kv_cache_utils import (  # noqa: E402
        get_request_block_hasher,
        init_none_hash,
    )
    from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
    from vllm.v1.kv_cache_interface import (  # noqa: E402
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        compute_layout_strides,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
    from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
    from vllm.v1.request import Request  # noqa: E402
    from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from kvtier.errors import LayoutError  # noqa: E402
from kvtier.integrations.vllm import KVTierConnector  # noqa: E402

BLOCK_SIZE, HEADS, HEAD_SIZE, NUM_BLOCKS = 16, 2, 16, 64
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
SPEC = FullAttentionSpec(
    block_size=BLOCK_SIZE, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.float16
)


def kv_cache_config() -> KVCacheConfig:
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(LAYERS, SPEC)],
    )


@pytest.fixture
def vllm_config(tmp_path: Path) -> VllmConfig:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": 1000,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": HEADS,
                "max_position_embeddings": 1024,
                "torch_dtype": "float16",
            }
        )
    )
    cache = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True)
    cache.kv_cache_layout = "LBNHC"
    cache.num_gpu_blocks = NUM_BLOCKS
    extra = store_settings(tmp_path / "kv", **{"store.block_tokens": 32})
    return VllmConfig(
        model_config=ModelConfig(
            model=str(model_dir), skip_tokenizer_init=True, dtype="float16"
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=1024,
            max_model_len=1024,
            is_encoder_decoder=False,
        ),
        cache_config=cache,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        ),
        device_config=DeviceConfig("cpu"),
    )


@pytest.fixture
def scheduler(vllm_config: VllmConfig) -> Iterator[Scheduler]:
    init_none_hash(sha256)
    sched = Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config(),
        log_stats=True,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK_SIZE,
    )
    yield sched
    sched.connector.shutdown()


def pages(layout: str) -> list[Any]:
    """Random pages in vLLM 0.33's own per-layer views of one int8 buffer."""
    order = KVCacheLayout[layout]
    strides = compute_layout_strides(SPEC, NUM_BLOCKS, len(LAYERS), order)
    layer_stride, block_stride = strides[0], strides[1]
    size = SPEC.page_size_bytes * NUM_BLOCKS * len(LAYERS)
    raw = torch.randint(-128, 127, (size,), dtype=torch.int8)
    tensor = KVCacheTensor(size, LAYERS, layer_stride, block_stride)
    return create_kv_cache_views(raw, SPEC, NUM_BLOCKS, order, tensor)


def request(request_id: str, tokens: list[int]) -> Request:
    return Request(
        request_id,
        tokens,
        SamplingParams(max_tokens=2),
        pooling_params=None,
        mm_features=None,
        block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256),
    )


def step(sched: Scheduler, worker: KVTierConnector | None) -> Any:
    """One scheduler step, with the worker's loads and saves around the 'forward'."""
    out = sched.schedule()
    if worker is not None:
        worker.bind_connector_metadata(out.kv_connector_metadata)
        worker.start_load_kv(None)
        worker.wait_for_save()
        invalid = worker.get_block_ids_with_load_errors()
        worker.clear_connector_metadata()
        assert not invalid
    req_ids = [r.req_id for r in out.scheduled_new_reqs] + list(
        out.scheduled_cached_reqs.req_ids
    )
    sched.update_from_output(
        out,
        ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] for _ in req_ids],
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
        ),
    )
    return out


@pytest.fixture
def worker(vllm_config: VllmConfig) -> Iterator[KVTierConnector]:
    """The worker half on random LBNHC pages (vLLM's default layout)."""
    connector = KVTierConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config())
    connector.register_kv_caches(dict(zip(LAYERS, pages("LBNHC"), strict=True)))
    yield connector
    connector.shutdown()


def serve_and_forget(
    sched: Scheduler, worker: KVTierConnector, prompt: list[int]
) -> Any:
    """Serves ``prompt`` (its blocks go to kvtier), then empties vLLM's own prefix
    cache, so that only kvtier can help the next request."""
    sched.add_request(request("first", prompt))
    out = step(sched, worker)
    sched.finish_requests("first", _finished())
    sched.reset_prefix_cache()
    return out


def test_connector_loads_by_module_path_and_matches_nothing_at_first(
    scheduler: Scheduler,
) -> None:
    assert isinstance(scheduler.connector, KVTierConnector)
    assert scheduler.connector.requires_kv_delivery is False
    scheduler.add_request(request("r1", list(range(100))))
    out = step(scheduler, None)
    meta = out.kv_connector_metadata
    assert out.num_scheduled_tokens["r1"] == 100
    assert meta.loads == []
    # 100 prompt tokens = three whole 32-token kvtier blocks, saved after the step
    [save] = meta.saves
    assert (save.first, save.end, save.num_tokens) == (0, 3, 96)
    assert len(save.block_ids) == 6


@pytest.mark.parametrize("layout", [m.name for m in KVCacheLayout])
def test_saved_prefix_loads_bit_exact_into_other_pages(
    scheduler: Scheduler, vllm_config: VllmConfig, layout: str
) -> None:
    worker = KVTierConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config())
    caches = pages(layout)
    worker.register_kv_caches(dict(zip(LAYERS, caches, strict=True)))
    prompt = list(range(1, 101))
    first = serve_and_forget(scheduler, worker, prompt)
    saved_ids = first.kv_connector_metadata.saves[0].block_ids
    before = [c[list(saved_ids)].clone() for c in caches]
    scheduler.add_request(request("b", prompt + [500, 501]))
    second = step(scheduler, worker)
    [load] = second.kv_connector_metadata.loads
    assert second.num_scheduled_tokens["b"] == 102 - 96
    assert (load.first, load.end, load.skip_tokens, load.num_tokens) == (0, 3, 0, 96)
    after = [c[list(load.block_ids)] for c in caches]
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old.view(torch.int16), new.view(torch.int16))
    worker.shutdown()


def test_whole_prompt_stored_still_computes_the_last_token(
    scheduler: Scheduler, worker: KVTierConnector
) -> None:
    prompt = list(range(64))
    serve_and_forget(scheduler, worker, prompt)
    scheduler.add_request(request("b", prompt))
    out = step(scheduler, None)
    [load] = out.kv_connector_metadata.loads
    assert out.num_scheduled_tokens["b"] == 16  # 48 loaded: vLLM block aligned
    assert (load.first, load.end, load.num_tokens) == (0, 2, 48)


def test_a_block_gone_before_the_load_is_reported_not_served(
    scheduler: Scheduler, worker: KVTierConnector
) -> None:
    prompt = list(range(200, 300))
    serve_and_forget(scheduler, worker, prompt)
    scheduler.add_request(request("b", prompt))
    out = scheduler.schedule()
    [load] = out.kv_connector_metadata.loads
    store = worker._blocks.backend  # the embedded store both halves share
    store.delete(list(load.keys(worker._settings.namespace))[1:])
    worker.bind_connector_metadata(out.kv_connector_metadata)
    worker.start_load_kv(None)
    assert worker.get_block_ids_with_load_errors() == set(load.block_ids[2:6])


def test_an_unknown_page_layout_is_refused(vllm_config: VllmConfig) -> None:
    worker = KVTierConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config())
    odd = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS * 2 * HEAD_SIZE + 1)
    with pytest.raises(LayoutError, match="unsupported KV cache layout"):
        worker.register_kv_caches({name: odd for name in LAYERS})
    worker.shutdown()


def _finished() -> Any:
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_ABORTED
