"""GhostList: the compact FIFO memory of evicted keys behind hit_density and S3-FIFO."""

from __future__ import annotations

import tracemalloc
from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.core.policy.ghost import GhostList

_KEYS = st.binary(min_size=1, max_size=3)  # few distinct keys: many repeats and pops
_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            _KEYS,
            st.integers(0, 9),
            st.floats(0, 1e6),
            st.integers(0, 2**40),
        ),
        st.tuples(st.just("pop"), _KEYS),
        st.tuples(st.just("has"), _KEYS),
        st.tuples(st.just("trim"), st.integers(0, 300)),
    ),
    max_size=600,
)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_behaves_as_an_ordered_dict_with_fifo_trim(ops: list[tuple]) -> None:
    ghost, model = GhostList(), OrderedDict()
    for op, *args in ops:
        if op == "add":
            key, *record = args
            ghost.add(key, *record)
            model.pop(key, None)
            model[key] = tuple(record)
        elif op == "pop":
            assert ghost.pop(args[0]) == model.pop(args[0], None)
        elif op == "has":
            assert (args[0] in ghost) == (args[0] in model)
        else:
            ghost.trim(args[0])
            while len(model) > args[0]:
                model.popitem(last=False)
        assert len(ghost) == len(model)
    for key in list(model):  # the survivors, with their records
        assert ghost.pop(key) == model[key]
    assert len(ghost) == 0


def test_oldest_go_first_and_a_readded_key_is_young_again() -> None:
    ghost = GhostList()
    for i in range(1000):
        ghost.add(i.to_bytes(4, "big"), i % 7, float(i), i)
    ghost.add((0).to_bytes(4, "big"), 1, 5.0, 2)  # refreshed: now the youngest
    ghost.trim(100)
    assert len(ghost) == 100
    assert ghost.pop((0).to_bytes(4, "big")) == (1, 5.0, 2)
    assert (900).to_bytes(4, "big") not in ghost  # 901..999 and key 0 were kept
    assert ghost.pop((901).to_bytes(4, "big")) == (901 % 7, 901.0, 901)


def test_steady_state_memory_is_a_fraction_of_a_dict_of_tuples() -> None:
    keys = [i.to_bytes(32, "big") for i in range(100_000)]
    tracemalloc.start()
    try:
        ghost = GhostList()
        for i, key in enumerate(keys):  # a sliding window: the bound holds 50,000
            ghost.add(key, 3, float(i), 7)
            ghost.trim(50_000)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ghost) == 50_000
    # An OrderedDict of the same records holds ~240 bytes a key; the ring and its index
    # stay under 64 (with the slack of the last growth).
    assert held / 50_000 < 64, held / 50_000
