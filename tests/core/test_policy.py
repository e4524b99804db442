"""Eviction policies: what every policy shares, the registry, a model check.

Each policy's own tests are in test_policy_<module>.py, which import the
helpers below.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.core.keys import BlockKey
from kvtier.core.policy import (
    POLICIES,
    CanEvict,
    EvictionPolicy,
    S3FIFOPolicy,
    make_policy,
)
from kvtier.errors import ConfigError

ALL_NAMES = ["lru", "weighted_lru", "leaf_lru", "s3fifo", "arc", "lfu", "hit_density"]
LEAF_FIRST = ("leaf_lru", "hit_density")


def k(name: str) -> BlockKey:
    return BlockKey(name.encode())


def names(keys: list[BlockKey]) -> list[str]:
    return [key.decode() for key in keys]


def drain(policy: EvictionPolicy, now: float = 100.0) -> list[str]:
    victims: list[str] = []
    while (key := policy.evict(now)) is not None:
        victims.append(key.decode())
    assert len(policy) == 0 and policy.total_bytes == 0
    return victims


def veto(*blocked: str) -> CanEvict:
    blocked_keys = {k(name) for name in blocked}
    return lambda key: key not in blocked_keys


# --- one script, four different orders --------------------------------------------


def run_shared_script(policy: EvictionPolicy) -> None:
    """a (hit twice, never since), b (child of a), c, d; then hits on c and b."""
    policy.insert(k("a"), 10, None, 0.0)
    policy.touch(k("a"), 0.0)
    policy.touch(k("a"), 0.0)
    policy.insert(k("b"), 10, k("a"), 1.0)
    policy.insert(k("c"), 10, None, 2.0)
    policy.insert(k("d"), 10, None, 3.0)
    policy.touch(k("c"), 4.0)
    policy.touch(k("b"), 5.0)


# lru: last accesses a < d < c < b.
# leaf_lru: a is b's parent, so it waits for b: d, c, b, then a.
# weighted_lru: d has no hits and is older than b and c, so goes first; a's two hits
#   (f = log2(3)/4 = 0.40, keep 0.20) keep it until only b and c are left, which both
#   have one hit; c is older.
# s3fifo: all start in small; a, b, c have hits and move to main, d has none and is
#   evicted from small; then main is a plain FIFO of a, b, c (counters reset).
# arc: hits moved a, c, b (in that order) to T2, so T1 is d alone and goes first (its
#   target p is still 0); then T2 in LRU order.
# lfu: accesses a 3, b 2, c 2, d 1; b and c tie and c's last access is older.
# hit_density: before its first refresh it ranks by age, and these ages share one
#   bucket; ties go to the lower class (fewer conversation accesses): d 1, c 2, b 4
#   (inherits a's 3, plus its hit), and a waits for its child b.
SHARED_ORDERS = {
    "lru": ["a", "d", "c", "b"],
    "leaf_lru": ["d", "c", "b", "a"],
    "weighted_lru": ["d", "a", "c", "b"],
    "s3fifo": ["d", "a", "b", "c"],
    "arc": ["d", "a", "c", "b"],
    "lfu": ["d", "c", "b", "a"],
    "hit_density": ["d", "c", "b", "a"],
}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_shared_script_exact_order(name: str) -> None:
    policy = make_policy(name)
    run_shared_script(policy)
    assert len(policy) == 4 and policy.total_bytes == 40
    assert drain(policy) == SHARED_ORDERS[name]


def test_shared_script_orders_differ_for_the_first_four() -> None:
    # The script tells lru, leaf_lru, weighted_lru and s3fifo apart; arc, lfu and
    # hit_density agree with one of them here and are told apart in their own tests.
    orders = {tuple(SHARED_ORDERS[name]) for name in ALL_NAMES[:4]}
    assert len(orders) == 4


# --- common behaviour --------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_evict_on_empty_returns_none(name: str) -> None:
    policy = make_policy(name)
    assert policy.evict(0.0) is None
    assert policy.evict_bytes(100, 0.0) == []


@pytest.mark.parametrize("name", ALL_NAMES)
def test_absent_keys_are_no_ops(name: str) -> None:
    policy = make_policy(name)
    policy.insert(k("a"), 7, None, 0.0)
    policy.touch(k("zz"), 1.0)
    policy.remove(k("zz"))
    assert len(policy) == 1 and policy.total_bytes == 7
    assert k("a") in policy and k("zz") not in policy and "a" not in policy


@pytest.mark.parametrize("name", ALL_NAMES)
def test_reinsert_updates_size_without_duplicating(name: str) -> None:
    policy = make_policy(name)
    policy.insert(k("a"), 10, None, 0.0)
    policy.insert(k("a"), 25, None, 1.0)
    assert len(policy) == 1 and policy.total_bytes == 25
    assert drain(policy) == ["a"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_negative_size_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="nbytes"):
        make_policy(name).insert(k("a"), -1, None, 0.0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_all_vetoed_returns_none_and_keeps_every_key(name: str) -> None:
    policy = make_policy(name)
    for i, key in enumerate("abcd"):
        policy.insert(k(key), 10, None, float(i))
    policy.touch(k("b"), 5.0)
    policy.touch(k("b"), 6.0)
    assert policy.evict(7.0, lambda key: False) is None
    assert policy.evict_bytes(40, 7.0, lambda key: False) == []
    assert len(policy) == 4 and policy.total_bytes == 40
    assert sorted(drain(policy)) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_evict_bytes_frees_enough_and_stops(name: str) -> None:
    policy = make_policy(name)
    sizes = {"a": 10, "b": 20, "c": 30, "d": 40}
    for i, (key, nbytes) in enumerate(sizes.items()):
        policy.insert(k(key), nbytes, None, float(i))
    victims = names(policy.evict_bytes(25, 10.0))
    freed = sum(sizes[key] for key in victims)
    assert freed >= 25
    assert freed - sizes[victims[-1]] < 25  # one victim fewer would not have done
    assert policy.total_bytes == 100 - freed
    assert len(policy) == 4 - len(victims)
    assert policy.evict_bytes(0, 10.0) == []
    rest = names(policy.evict_bytes(1000, 10.0))
    assert sorted(victims + rest) == ["a", "b", "c", "d"]
    assert len(policy) == 0 and policy.total_bytes == 0


class _FifoPolicy(EvictionPolicy):
    """The smallest policy: uses the base class's default evict_bytes."""

    name = "test_fifo"

    def __init__(self) -> None:
        self.sizes: dict[BlockKey, int] = {}

    def insert(
        self, key: BlockKey, nbytes: int, parent: BlockKey | None, now: float
    ) -> None:
        self.sizes.setdefault(key, nbytes)

    def touch(self, key: BlockKey, now: float) -> None:
        pass

    def remove(self, key: BlockKey) -> None:
        self.sizes.pop(key, None)

    def evict(self, now: float, can_evict: CanEvict | None = None) -> BlockKey | None:
        for key in self.sizes:
            if can_evict is None or can_evict(key):
                del self.sizes[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self.sizes)

    def __contains__(self, key: object) -> bool:
        return key in self.sizes

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def test_default_evict_bytes_loops_over_evict() -> None:
    policy = _FifoPolicy()
    for key, nbytes in [("a", 10), ("b", 5), ("c", 20), ("d", 1)]:
        policy.insert(k(key), nbytes, None, 0.0)
    assert names(policy.evict_bytes(12, 0.0, veto("b"))) == ["a", "c"]
    assert names(policy.evict_bytes(100, 0.0, veto("b"))) == ["d"]
    assert policy.evict_bytes(0, 0.0) == []
    assert list(policy.sizes) == [k("b")]
    assert repr(policy) == "_FifoPolicy(1 keys, 5 bytes)"


# --- registry ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_make_policy_builds_each_name(name: str) -> None:
    policy = make_policy(name)
    assert type(policy) is POLICIES[name]
    assert policy.name == name
    assert repr(policy).endswith("(0 keys, 0 bytes)")


def test_registry_lists_exactly_the_policies() -> None:
    assert list(POLICIES) == ALL_NAMES


def test_make_policy_passes_options() -> None:
    policy = make_policy("s3fifo", small_ratio=0.5, promote_hits=2)
    assert isinstance(policy, S3FIFOPolicy)
    policy.insert(k("a"), 1, None, 0.0)
    policy.touch(k("a"), 0.0)
    assert policy.evict(0.0) == k("a")  # one hit short of promote_hits=2


def test_make_policy_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(ConfigError) as excinfo:
        make_policy("mru")
    assert str(excinfo.value) == (
        "policy must be one of ['lru', 'weighted_lru', 'leaf_lru', 's3fifo', 'arc', "
        "'lfu', 'hit_density'], got 'mru'"
    )
    assert isinstance(excinfo.value, ValueError)


def test_make_policy_bad_option_is_named() -> None:
    with pytest.raises(ConfigError, match="'small_ratio'"):
        make_policy("lru", small_ratio=0.1)
    with pytest.raises(ConfigError, match="small_ratio"):
        make_policy("s3fifo", small_ratio=2.0)
    with pytest.raises(ConfigError, match="weighted_lru"):
        make_policy("weighted_lru", hit_cap="many")


# --- property test against a model -------------------------------------------------

KEY_NAMES = [f"k{i}" for i in range(8)]
key_st = st.sampled_from(KEY_NAMES)
leased_st = st.frozensets(key_st, max_size=4)
op_st = st.one_of(
    st.tuples(
        st.just("insert"),
        key_st,
        st.integers(0, 50),
        st.none() | key_st,
        st.floats(0, 5),
    ),
    st.tuples(st.just("touch"), key_st, st.floats(0, 5)),
    st.tuples(st.just("remove"), key_st),
    st.tuples(st.just("evict"), leased_st),
    st.tuples(st.just("evict_bytes"), st.integers(-5, 120), leased_st),
)


class Model:
    """What any policy must agree with: the tracked set, sizes, and who may go."""

    def __init__(self, policy_name: str) -> None:
        self.policy_name = policy_name
        self.sizes: dict[str, int] = {}
        self.parents: dict[str, str | None] = {}
        self.recency: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str, nbytes: int, parent: str | None) -> None:
        if parent == key:
            parent = None
        if key not in self.sizes or self.parents[key] is None:
            self.parents[key] = parent
        self.sizes[key] = nbytes
        self.access(key)

    def access(self, key: str) -> None:
        if key in self.sizes:
            self.recency[key] = None
            self.recency.move_to_end(key)

    def forget(self, key: str) -> None:
        del self.sizes[key], self.parents[key], self.recency[key]

    def may_evict(self, key: str, leased: frozenset[str]) -> bool:
        if key in leased:
            return False
        if self.policy_name not in LEAF_FIRST:
            return True
        return all(self.parents[other] != key for other in self.sizes)

    def expected_victim(self, leased: frozenset[str]) -> str | None:
        """The exact victim for the LRU-ordered policies; None for the others."""
        if self.policy_name not in ("lru", "leaf_lru"):
            return None
        return next((key for key in self.recency if self.may_evict(key, leased)), None)


def check_victims(model: Model, victims: list[str], leased: frozenset[str]) -> int:
    freed = 0
    for victim in victims:
        assert victim in model.sizes, f"evicted untracked {victim}"
        assert model.may_evict(victim, leased), f"{victim} may not be evicted"
        expected = model.expected_victim(leased)
        assert expected is None or victim == expected
        freed += model.sizes[victim]
        model.forget(victim)
    return freed


def nothing_evictable(model: Model, leased: frozenset[str]) -> bool:
    return not any(model.may_evict(key, leased) for key in model.sizes)


def apply(
    policy: EvictionPolicy, model: Model, op: tuple[object, ...], now: float
) -> None:
    kind = op[0]
    if kind == "insert":
        _, key, nbytes, parent, _ = op
        assert isinstance(key, str) and isinstance(nbytes, int)
        assert parent is None or isinstance(parent, str)
        policy.insert(k(key), nbytes, k(parent) if parent else None, now)
        model.insert(key, nbytes, parent)
    elif kind == "touch":
        key = op[1]
        assert isinstance(key, str)
        policy.touch(k(key), now)
        model.access(key)
    elif kind == "remove":
        key = op[1]
        assert isinstance(key, str)
        policy.remove(k(key))
        if key in model.sizes:
            model.forget(key)
    else:
        apply_eviction(policy, model, op, now)


def apply_eviction(
    policy: EvictionPolicy, model: Model, op: tuple[object, ...], now: float
) -> None:
    leased = op[-1]
    assert isinstance(leased, frozenset)

    def can_evict(key: BlockKey) -> bool:
        return key.decode() not in leased

    if op[0] == "evict":
        victim = policy.evict(now, can_evict)
        if victim is None:
            assert nothing_evictable(model, leased)
        else:
            check_victims(model, [victim.decode()], leased)
        return
    nbytes = op[1]
    assert isinstance(nbytes, int)
    victims = names(policy.evict_bytes(nbytes, now, can_evict))
    assert len(set(victims)) == len(victims)
    sizes_before = dict(model.sizes)
    freed = check_victims(model, victims, leased)
    if nbytes <= 0:
        assert victims == []
    elif freed < nbytes:
        assert nothing_evictable(model, leased)
    else:
        assert freed - sizes_before[victims[-1]] < nbytes


@pytest.mark.parametrize("name", ALL_NAMES)
@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op_st, max_size=60))
def test_policy_matches_model(name: str, ops: list[tuple[object, ...]]) -> None:
    policy, model = make_policy(name), Model(name)
    now = 0.0
    for op in ops:
        if isinstance(op[-1], float):
            now += op[-1]
        apply(policy, model, op, now)
        assert {key for key in KEY_NAMES if k(key) in policy} == set(model.sizes)
        assert len(policy) == len(model.sizes)
        assert policy.total_bytes == sum(model.sizes.values())


@pytest.mark.parametrize("name", ALL_NAMES)
@settings(max_examples=40, deadline=None)
@given(
    parents=st.lists(st.integers(min_value=-1, max_value=30), min_size=1, max_size=40),
    touched=st.lists(st.integers(min_value=0, max_value=39), max_size=10),
)
def test_load_is_inserting_in_order(
    name: str, parents: list[int], touched: list[int]
) -> None:
    """A reopened tier's bulk load leaves the policy choosing the same victims, in
    the same order, as inserting the same blocks one by one (chains included)."""
    blocks = [
        (k(f"b{i}"), 10 + i, k(f"b{p}") if 0 <= p < i else None)
        for i, p in enumerate(parents)
    ]
    one_by_one, loaded = make_policy(name), make_policy(name)
    for key, nbytes, parent in blocks:
        one_by_one.insert(key, nbytes, parent, 1.0)
    loaded.load(blocks, 1.0)
    assert (
        len(loaded) == len(one_by_one) and loaded.total_bytes == one_by_one.total_bytes
    )
    for i in touched:  # both keep working the same afterwards
        if i < len(blocks):
            one_by_one.touch(blocks[i][0], 2.0 + i)
            loaded.touch(blocks[i][0], 2.0 + i)
    assert drain(loaded, 50.0) == drain(one_by_one, 50.0)
