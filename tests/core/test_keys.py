"""Block keys: chaining, namespaces, determinism across processes, input forms."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvtier.core.keys import (
    KEY_BYTES,
    KeyChain,
    Namespace,
    block_keys,
    engine_keys,
)
from kvtier.errors import KeyFormatError

NS = Namespace("model-a", layout_id="L2P2T4H1D8:float16", block_tokens=4)


def test_one_key_per_full_block_and_no_key_for_the_tail() -> None:
    keys = block_keys(NS, list(range(10)))
    assert len(keys) == 2
    assert all(len(k) == KEY_BYTES for k in keys)


def test_keys_are_chained_so_a_different_first_block_changes_every_key() -> None:
    a = block_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8])
    b = block_keys(NS, [9, 2, 3, 4, 5, 6, 7, 8])
    assert a[0] != b[0]
    assert a[1] != b[1]  # same tokens in block 1, different prefix


def test_shared_prefix_gives_shared_leading_keys() -> None:
    a = block_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8])
    b = block_keys(NS, [1, 2, 3, 4, 0, 0, 0, 0])
    assert a[0] == b[0]
    assert a[1] != b[1]


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_id", "model-b"),
        ("layout_id", "L2P2T4H1D8:bfloat16"),
        ("tp_rank", 1),
        ("tenant", "acme"),
        ("cache_salt", "user-7"),
        ("lora_id", "sql-adapter"),
        ("hash_seed", 42),
    ],
)
def test_every_namespace_field_separates_keys(field: str, value: object) -> None:
    kwargs = {"model_id": "model-a", "layout_id": NS.layout_id, "block_tokens": 4}
    if field == "tp_rank":
        kwargs["tp_size"] = 2
    kwargs[field] = value
    other = Namespace(**kwargs)  # type: ignore[arg-type]
    tokens = list(range(8))
    assert block_keys(other, tokens)[0] != block_keys(NS, tokens)[0]


def test_list_numpy_and_all_int_dtypes_give_the_same_keys() -> None:
    tokens = [5, 70000, 3, 2**31 - 1, 8, 9, 10, 11]
    expected = list(block_keys(NS, tokens))
    for dtype in (np.int64, np.uint32, np.int32, np.uint64):
        assert list(block_keys(NS, np.array(tokens, dtype=dtype))) == expected
    assert list(block_keys(NS, tuple(tokens))) == expected


def test_torch_tensors_give_the_same_keys() -> None:
    torch = pytest.importorskip("torch")
    tokens = list(range(100, 116))
    assert list(block_keys(NS, torch.tensor(tokens))) == list(block_keys(NS, tokens))


@pytest.mark.parametrize(
    "bad",
    [
        [1, -2, 3, 4],
        [1, 2**32, 3, 4],
        np.array([[1, 2], [3, 4]]),
        np.array([1.5, 2.0]),
        "1234",
        [1, "x", 3, 4],
    ],
)
def test_bad_token_ids_are_refused_with_a_clear_error(bad: object) -> None:
    with pytest.raises(KeyFormatError, match="token ids"):
        block_keys(NS, bad)


def test_bad_namespaces_are_refused() -> None:
    with pytest.raises(KeyFormatError, match="block_tokens"):
        Namespace("m", block_tokens=0)
    with pytest.raises(KeyFormatError, match="tp_rank"):
        Namespace("m", tp_rank=2, tp_size=2)
    with pytest.raises(KeyFormatError, match="hash_algo"):
        Namespace("m", hash_algo="md5")  # type: ignore[arg-type]


def test_keys_are_deterministic_across_processes_with_other_hash_seeds() -> None:
    script = (
        "import json, sys\n"
        "from kvtier.core.keys import Namespace, block_keys, engine_keys\n"
        "ns = Namespace('model-a', layout_id='L2P2T4H1D8:float16', block_tokens=4,"
        " tenant='t', lora_id='l')\n"
        "keys = block_keys(ns, list(range(40)))\n"
        "eng = engine_keys(ns, [b'h1', 17, 2**64 - 1])\n"
        "print(json.dumps([k.hex() for k in list(keys) + list(eng)]))\n"
    )
    outputs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(json.loads(out.stdout))
    ns = Namespace(
        "model-a", layout_id=NS.layout_id, block_tokens=4, tenant="t", lora_id="l"
    )
    here = [k.hex() for k in list(block_keys(ns, list(range(40))))]
    here += [k.hex() for k in engine_keys(ns, [b"h1", 17, 2**64 - 1])]
    assert outputs[0] == outputs[1] == here


def test_engine_keys_are_chained_namespaced_and_accept_ints_and_bytes() -> None:
    a = engine_keys(NS, [b"\x01" * 32, b"\x02" * 32])
    b = engine_keys(NS, [b"\x09" * 32, b"\x02" * 32])
    assert a[1] != b[1]
    other = engine_keys(Namespace("model-a", tenant="x"), [b"\x01" * 32])
    assert other[0] != a[0]
    assert engine_keys(NS, [5])[0] == engine_keys(NS, [(5).to_bytes(8, "big")])[0]
    with pytest.raises(KeyFormatError, match="engine hash #1"):
        engine_keys(NS, [1, -1])
    with pytest.raises(KeyFormatError, match="bytes or int"):
        engine_keys(NS, [1.5])  # type: ignore[list-item]


def test_key_chain_slices_keep_parents_and_namespace() -> None:
    chain = block_keys(NS, list(range(16)))
    assert isinstance(chain, KeyChain)
    assert chain.parents() == [None, chain[0], chain[1], chain[2]]
    tail = chain[2:]
    assert isinstance(tail, KeyChain)
    assert tail.parent == chain[1]
    assert tail.namespace is NS
    assert list(tail) == [chain[2], chain[3]]
    assert tail.parents() == [chain[1], chain[2]]
    assert chain[:0].parents() == []  # one parent per key, so none for no key
    with pytest.raises(KeyFormatError, match="step 1"):
        chain[::2]
