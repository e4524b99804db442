"""Decoding vLLM's KV event batches: both event forms, both batch forms, bad input."""

from __future__ import annotations

import msgpack
import pytest
from tests.router import vllm

from kvtier.errors import EventFormatError
from kvtier.router.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_batch,
)

TOKENS = list(range(32))
HASHES = vllm.engine_hashes(TOKENS)


@pytest.mark.parametrize("form", ["map", "array"])
@pytest.mark.parametrize("as_int", [True, False])
def test_both_forms_and_both_hash_types_decode_alike(
    form: vllm.Form, as_int: bool
) -> None:
    hashes = [vllm.as_int(h) if as_int else h for h in HASHES]
    payload = vllm.batch(
        [
            vllm.stored(hashes, None, TOKENS, form=form),
            vllm.removed(hashes[1:], form=form),
            vllm.cleared(form=form),
        ],
        ts=12.5,
        form=form,
    )
    batch = decode_batch(payload)
    assert batch.ts == 12.5
    assert batch.events == [
        BlockStored(hashes, None, TOKENS, 16, "GPU"),
        BlockRemoved(hashes[1:], "GPU"),
        AllBlocksCleared(),
    ]
    assert batch.data_parallel_rank == (0 if form == "map" else None)
    assert batch.num_unknown == 0


def test_map_form_carries_lora_extra_keys_and_group() -> None:
    event = vllm.MapBlockStored(
        [1, 2], 7, TOKENS, 16, None, "CPU", "sql", [(("cache_salt", "u1"),), None], 0
    )
    (decoded,) = decode_batch(vllm.batch([event])).events
    assert decoded == BlockStored(
        [1, 2], 7, TOKENS, 16, "CPU", "sql", [[["cache_salt", "u1"]], None], 0
    )


def test_a_batch_encoded_as_a_map_decodes_too() -> None:
    # vLLM sources without array_like on EventBatch send {"ts", "events", ...}
    payload = msgpack.packb(
        {"ts": 3.0, "events": [{"type": "AllBlocksCleared"}], "data_parallel_rank": 2}
    )
    batch = decode_batch(payload)
    assert batch.events == [AllBlocksCleared()] and batch.data_parallel_rank == 2


def test_old_lora_id_becomes_the_lora_name_and_missing_fields_read_none() -> None:
    payload = msgpack.packb([1.0, [["BlockStored", [5], None, TOKENS[:16], 16, 3]]])
    (event,) = decode_batch(payload).events
    assert event == BlockStored([5], None, TOKENS[:16], 16, None, "3")


def test_unknown_event_types_are_skipped_and_counted() -> None:
    payload = msgpack.packb(
        [1.0, [{"type": "BlockPinned", "x": 1}, ["AllBlocksCleared"], ["Later", 2]]]
    )
    batch = decode_batch(payload)
    assert batch.events == [AllBlocksCleared()] and batch.num_unknown == 2


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb("hello"), "must be a map or an array"),
        (msgpack.packb([1.0, "x"]), r"needs \[ts, events"),
        (msgpack.packb([1.0, [7]]), "tagged map or array"),
        (msgpack.packb([1.0, [[3, 4]]]), "event type must be a string"),
        (msgpack.packb([1.0, [["BlockRemoved", "ab"]]]), "must be a list"),
        (msgpack.packb([1.0, [["BlockRemoved", [1.5]]]]), "int or bytes"),
        (msgpack.packb([1.0, [["BlockStored", [1], None, 5, 16]]]), "token_ids"),
        (msgpack.packb([1.0, [["BlockRemoved", [1], 7]]]), "medium must be a str"),
        (msgpack.packb([1.0, [["BlockStored", [1], 2.5, [], 16]]]), "parent_block"),
    ],
)
def test_malformed_batches_raise_event_format_error(
    payload: bytes, message: str
) -> None:
    with pytest.raises(EventFormatError, match=message):
        decode_batch(payload)
