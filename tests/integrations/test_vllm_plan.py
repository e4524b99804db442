"""The vLLM connector's scheduler half on plain objects (no vLLM needed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kvtier.core.keys import Namespace, engine_keys
from kvtier.integrations._vllm_scheduler import SchedulerSide
from kvtier.integrations.backend import Blocks
from kvtier.store import TieredStore

ENGINE_BLOCK, BLOCK = 16, 32


def request(req_id: str, num_tokens: int, salt: int = 0) -> Any:
    hashes = [bytes([salt, i]) * 16 for i in range(num_tokens // ENGINE_BLOCK)]
    return SimpleNamespace(
        request_id=req_id,
        block_hashes=hashes,
        num_tokens=num_tokens,
        num_prompt_tokens=num_tokens,
        all_token_ids=list(range(num_tokens)),
    )


def output(new: list[Any], scheduled: dict[str, int], cached: Any = None) -> Any:
    return SimpleNamespace(
        scheduled_new_reqs=new,
        scheduled_cached_reqs=cached
        or SimpleNamespace(
            req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()
        ),
        num_scheduled_tokens=scheduled,
        preempted_req_ids=set(),
    )


def side(store: TieredStore) -> SchedulerSide:
    return SchedulerSide(Blocks(store), Namespace("m"), BLOCK, ENGINE_BLOCK)


def test_chunked_prefill_saves_each_block_once_it_is_computed(
    store: TieredStore,
) -> None:
    sched = side(store)
    req = request("r", 100)
    assert sched.num_new_matched_tokens(req, 0) == (0, False)
    sched.after_alloc(req, 0)
    new = SimpleNamespace(req_id="r", block_ids=([1, 2, 3],), num_computed_tokens=0)
    first = sched.build(output([new], {"r": 40}))
    assert first.loads == [] and [(s.first, s.end) for s in first.saves] == [(0, 1)]
    assert first.saves[0].block_ids == (1, 2)
    cached = SimpleNamespace(
        req_ids=["r"],
        new_block_ids=[([4, 5, 6, 7],)],
        num_computed_tokens=[40],
        resumed_req_ids=set(),
    )
    second = sched.build(output([], {"r": 60}, cached))
    [save] = second.saves
    assert (save.first, save.end, save.block_ids) == (1, 3, (3, 4, 5, 6))
    [stored_first, stored_second] = sched.take_stored()
    assert stored_second.parent_hash == req.block_hashes[1]
    assert stored_second.token_ids == tuple(range(32, 96))


def test_a_match_loads_past_vllms_own_hit_and_keeps_the_last_token(
    store: TieredStore,
) -> None:
    sched = side(store)
    req = request("r", 100)
    keys = engine_keys(sched.namespace, sched.block_hashes(req))
    store.put(keys, [b"x" * 8] * 3)
    # vLLM's own prefix cache already has 16 tokens: kvtier adds 80 more
    assert sched.num_new_matched_tokens(req, 16) == (80, False)
    sched.after_alloc(req, 80)
    new = SimpleNamespace(
        req_id="r", block_ids=([9, 8, 7, 6, 5, 4, 3],), num_computed_tokens=96
    )
    plan = sched.build(output([new], {"r": 4}))
    [load] = plan.loads
    assert (load.first, load.end, load.skip_tokens, load.num_tokens) == (0, 3, 16, 80)
    assert load.block_ids == (9, 8, 7, 6, 5, 4)
    assert plan.saves == []  # the matched blocks are stored already
    whole = request("w", 64)
    store.put(engine_keys(sched.namespace, sched.block_hashes(whole)), [b"y" * 8] * 2)
    assert sched.num_new_matched_tokens(whole, 0) == (48, False)


def test_a_conversations_last_turn_finishes_its_prompt(
    store: TieredStore, monkeypatch: Any
) -> None:
    finished: list[list[bytes]] = []
    real_finish = store.finish
    monkeypatch.setattr(
        store, "finish", lambda keys: (finished.append(list(keys)), real_finish(keys))
    )
    sched = side(store)
    for req_id, over in (("goes-on", False), ("last-turn", True)):
        req = request(req_id, 100, salt=len(req_id))
        sched.num_new_matched_tokens(req, 0)
        sched.after_alloc(req, 0)
        sched.finished(req_id, conversation_over=over)
    # Only the last turn's prompt, as the keys of its 3 whole kvtier blocks.
    last = request("last-turn", 100, salt=len("last-turn"))
    assert finished == [list(engine_keys(Namespace("m"), sched.block_hashes(last)))]
    assert len(finished[0]) == 3
