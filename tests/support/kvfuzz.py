"""Hypothesis settings of the fuzz tests: a few hundred inputs per target in the
default suite; ``KVFUZZ_SCALE=20`` (what the slow suite's long run sets) makes
every target take twenty times as many."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = max(1, int(os.environ.get("KVFUZZ_SCALE", "1")))


def fuzz(examples: int) -> settings:
    """Settings for a target fuzzed with ``examples`` inputs (times the scale)."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


def trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nested lists and string-keyed maps of ``leaves``."""
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


MSGPACK = trees(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.binary(max_size=40)
    | st.text(max_size=20)
)
"""Anything msgpack encodes."""

JSON = trees(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
"""Anything JSON encodes."""
