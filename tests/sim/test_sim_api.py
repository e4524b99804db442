"""kvtier.sim's public names are exactly its __all__."""

from __future__ import annotations

import kvtier.sim


def test_sim_api_is_exactly_all() -> None:
    ours = {
        name
        for name, obj in vars(kvtier.sim).items()
        if not name.startswith("_")
        and getattr(obj, "__module__", "").startswith("kvtier")
    }
    assert set(kvtier.sim.__all__) - {"SHAPES"} == ours
    assert len(set(kvtier.sim.__all__)) == len(kvtier.sim.__all__)
