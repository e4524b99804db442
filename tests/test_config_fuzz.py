"""Fuzzing the configuration: YAML files, KVTIER_* variables and --set overrides.

Whatever an operator (or a typo) writes, loading either gives a valid ``Config`` or
raises ``ConfigError`` with a message; never another exception.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st
from kvfuzz import fuzz, trees

from kvtier.config import Config, load_config
from kvtier.errors import ConfigError

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
KEYS = {
    name: [f.name for f in dataclasses.fields(getattr(Config(), name))]
    for name in SECTIONS
}
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["4GiB", "1.5g", "0", "-1", "lru", "write_back", "tcp://x:1"])
)
VALUES = trees(SCALARS)


@st.composite
def sections(draw: st.DrawFn) -> dict[str, object]:
    """Mostly real sections and keys (to get past the first check), some not."""
    tree: dict[str, object] = {}
    for name in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=3)):
        keys = draw(
            st.lists(st.sampled_from(KEYS[name]) | st.text(max_size=8), max_size=4)
        )
        tree[name] = {key: draw(VALUES) for key in keys}
    if draw(st.booleans()):
        tree[draw(st.text(max_size=8))] = draw(VALUES)
    return tree


def loads_or_config_error(**kwargs: object) -> None:
    try:
        config = load_config(**kwargs)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert str(exc)  # says what is wrong
        return
    assert isinstance(config, Config)


@fuzz(400)
@given(tree=sections() | VALUES, raw=st.booleans(), junk=st.text(max_size=60))
def test_fuzzed_yaml_files_load_or_raise_config_error(
    tmp_path: Path, tree: object, raw: bool, junk: str
) -> None:
    path = tmp_path / "kvtier.yaml"
    path.write_text(junk if raw else yaml.safe_dump(tree))
    loads_or_config_error(path=path, env={})


ENV_NAMES = st.sampled_from(
    [f"KVTIER_{s.upper()}_{k.upper()}" for s in KEYS for k in KEYS[s]]
) | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", max_size=20).map(
    lambda n: "KVTIER_" + n
)


@fuzz(400)
@given(env=st.dictionaries(ENV_NAMES, st.text(max_size=30), max_size=4))
def test_fuzzed_environments_load_or_raise_config_error(env: dict[str, str]) -> None:
    env.pop("KVTIER_CONFIG", None)  # names a file: the YAML test covers those
    loads_or_config_error(env=env)


DOTTED = st.sampled_from([f"{s}.{k}" for s in KEYS for k in KEYS[s]]) | st.text(
    max_size=20
)


@fuzz(400)
@given(overrides=st.dictionaries(DOTTED, VALUES | st.text(max_size=30), max_size=4))
def test_fuzzed_overrides_load_or_raise_config_error(
    overrides: dict[str, object],
) -> None:
    loads_or_config_error(env={}, overrides=overrides)
