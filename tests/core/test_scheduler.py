"""Scheduler: hand-computed plans, preemption, rejection, determinism, PP micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from emulator.core import RequestTable, Scheduler, SchedulerConfig, Status
from emulator.errors import ConfigError


def ids(a) -> list[int]:
    return [int(x) for x in a]


def table(prompts, outputs, arrivals=None) -> RequestTable:
    n = len(prompts)
    return RequestTable.from_columns([f"r{i}" for i in range(n)], arrivals or [0.0] * n,
                                     prompts, outputs)


def run_to_end(s: Scheduler, *, start_s: float = 0.0) -> list[tuple]:
    """Drive schedule/on_plan_done with 1 s steps; return one tuple per plan."""
    log, now = [], start_s
    while s.has_work:
        p = s.schedule(now)
        assert p is not None
        now += 1.0
        done = s.on_plan_done(p, now)
        log.append((p.step, p.request_ids, ids(p.num_new_tokens), ids(p.num_context_tokens),
                    [bool(x) for x in p.is_prefill], p.num_preempted, s.kv_blocks_used, ids(done)))
    return log


def test_three_requests_chunked_prefill_step_by_step() -> None:
    t = table([40, 20, 5], [3, 4, 2])
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8), 20, t)
    for i in range(3):
        assert s.add_request(i, 0.0)
    # step, ids, new tokens, context, is_prefill, preempted, blocks used after done, finished
    assert run_to_end(s) == [
        # r0's prompt is chunked at the 32-token budget (2 blocks)
        (0, ["r0"], [32], [0], [True], 0, 2, []),
        # r0 finishes its prompt (8), r1 whole (20), r2 gets the 4 tokens left
        (1, ["r0", "r1", "r2"], [8, 20, 4], [32, 0, 0], [True, True, True], 0, 6, []),
        # r0, r1 decode; r2 computes its last prompt token (still a prefill)
        (2, ["r0", "r1", "r2"], [1, 1, 1], [40, 20, 4], [False, False, True], 0, 6, []),
        (3, ["r0", "r1", "r2"], [1, 1, 1], [41, 21, 5], [False, False, False], 0, 2, [0, 2]),
        (4, ["r1"], [1], [22], [False], 0, 0, [1]),
    ]
    assert ids(t.num_output_tokens) == [3, 4, 2]
    assert ids(t.num_computed_tokens) == [42, 23, 6]  # prompt + output - 1: last token never cached
    assert t.first_token_s.tolist() == [2.0, 2.0, 3.0]
    assert t.finish_s.tolist() == [4.0, 5.0, 4.0]
    assert ids(t.status) == [Status.FINISHED] * 3 and ids(t.replica) == [0, 0, 0]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget() -> None:
    t = table([20, 20], [2, 2])
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8,
                                  enable_chunked_prefill=False), 20, t)
    s.add_request(0, 0.0)
    s.add_request(1, 0.0)
    log = run_to_end(s)
    assert [(e[1], e[2]) for e in log] == [(["r0"], [20]), (["r0", "r1"], [1, 20]), (["r1"], [1])]


def test_preemption_when_blocks_run_out_newest_is_victim_and_recomputes() -> None:
    # block_size 4, 6 blocks: each request holds 2 blocks after its 8-token prompt
    t = table([8, 8], [6, 6])
    s = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=8), 6, t)
    s.add_request(0, 0.0)
    s.add_request(1, 0.0)
    log = run_to_end(s)
    assert log == [
        (0, ["r0", "r1"], [8, 8], [0, 0], [True, True], 0, 4, []),
        (1, ["r0", "r1"], [1, 1], [8, 8], [False, False], 0, 6, []),  # token 8: a 3rd block each
        (2, ["r0", "r1"], [1, 1], [9, 9], [False, False], 0, 6, []),
        (3, ["r0", "r1"], [1, 1], [10, 10], [False, False], 0, 6, []),
        (4, ["r0", "r1"], [1, 1], [11, 11], [False, False], 0, 6, []),
        # token 12 needs a 4th block, none free: r1 (newest) is preempted, r0 goes on alone
        (5, ["r0"], [1], [12], [False], 1, 0, [0]),
        # r1 re-prefills prompt + its 5 sampled tokens and samples its 6th (last) token
        (6, ["r1"], [13], [0], [True], 0, 0, [1]),
    ]
    assert ids(t.num_preemptions) == [0, 1] and s.num_preemptions_total == 1
    assert ids(t.num_output_tokens) == [6, 6] and ids(t.num_computed_tokens) == [13, 13]
    assert t.first_token_s.tolist() == [1.0, 1.0] and t.finish_s.tolist() == [6.0, 7.0]


def test_request_that_cannot_get_a_block_preempts_itself_and_goes_first_in_line() -> None:
    t = table([8, 8, 4], [6, 6, 2])
    s = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=2), 5, t)
    for i in range(3):
        s.add_request(i, 0.0)
    p0 = s.schedule(0.0)
    assert p0.request_ids == ["r0", "r1"]  # max_num_seqs=2 keeps r2 waiting
    s.on_plan_done(p0, 1.0)
    p1 = s.schedule(1.0)  # r0 takes the last free block, r1 is the newest: it preempts itself
    assert p1.request_ids == ["r0"] and p1.num_preempted == 1
    assert ids(s.waiting_requests()) == [1, 2]  # the victim is requeued at the front
    assert t.status[1] == Status.WAITING and t.num_computed_tokens[1] == 0
    s.on_plan_done(p1, 2.0)
    # r1 needs 3 blocks to recompute 9 tokens; 2 are free: it waits (FCFS, r2 is behind it)
    p2 = s.schedule(2.0)
    assert p2.request_ids == ["r0"] and ids(s.waiting_requests()) == [1, 2]


def test_rejects_requests_that_can_never_run() -> None:
    t = table([100, 30, 10], [100, 10, 1])
    s = Scheduler(SchedulerConfig(block_size=16, enable_chunked_prefill=False,
                                  max_num_batched_tokens=32, max_num_seqs=8), 10, t)
    assert not s.add_request(0, 0.0)  # 199 tokens need 13 blocks > 10
    assert not s.add_request(1, 0.0)  # 39 tokens > 32 without chunked prefill
    assert s.add_request(2, 0.0)
    assert ids(t.status) == [Status.REJECTED, Status.REJECTED, Status.WAITING]
    assert "needs 13 KV blocks" in t.rejections[0]
    assert "max_num_batched_tokens=32" in t.rejections[1]
    assert s.num_rejected == 2 and s.num_waiting == 1
    with pytest.raises(ValueError, match="already added"):
        s.add_request(2, 0.0)


def test_config_checks() -> None:
    t = table([8], [2])
    with pytest.raises(ConfigError, match="not supported yet"):
        Scheduler(SchedulerConfig(preemption_mode="swap"), 10, t)
    with pytest.raises(ValidationError, match="multiple of block_size"):
        SchedulerConfig(hash_block_tokens=40)
    with pytest.raises(ValidationError):
        SchedulerConfig(max_num_seqs=4, typo=1)
    with pytest.raises(ValidationError, match="must be >= max_num_seqs=256"):
        SchedulerConfig(max_num_batched_tokens=128)


def test_record_slots_matches_block_tables() -> None:
    t = table([20, 3], [3, 2])
    s = Scheduler(SchedulerConfig(block_size=16, record_slots=True), 10, t)
    s.add_request(0, 0.0)
    s.add_request(1, 0.0)
    p = s.schedule(0.0)
    assert ids(p.new_slot_ids) == list(range(20)) + [32, 33, 34]  # r0: blocks 0,1; r1: block 2
    s.on_plan_done(p, 1.0)
    p = s.schedule(1.0)
    assert ids(p.new_slot_ids) == [20, 35]


def workload(seed: int) -> RequestTable:
    rng = np.random.default_rng(seed)
    n = 40
    return table(rng.integers(1, 200, n).tolist(), rng.integers(1, 120, n).tolist(),
                 np.sort(rng.uniform(0, 5, n)).tolist())


def drive(t: RequestTable) -> tuple[list, Scheduler]:
    s = Scheduler(SchedulerConfig(block_size=16, max_num_batched_tokens=256, max_num_seqs=16), 60, t)
    nxt, now, log = 0, 0.0, []
    while nxt < len(t) or s.has_work:
        while nxt < len(t) and t.arrival_s[nxt] <= now:
            s.add_request(nxt, now)
            nxt += 1
        p = s.schedule(now)
        if p is None:
            now = float(t.arrival_s[nxt])
            continue
        now += 0.01 * (1 + p.num_tokens / 64)
        log.append((ids(p.request_index), ids(p.num_new_tokens), ids(s.on_plan_done(p, now))))
    return log, s


def test_same_inputs_give_identical_results() -> None:
    log_a, s_a = drive(workload(3))
    log_b, s_b = drive(workload(3))
    assert log_a == log_b
    for k, v in s_a.requests.state_arrays().items():
        np.testing.assert_array_equal(v, s_b.requests.state_arrays()[k], err_msg=k)
    assert s_a.num_preemptions_total == s_b.num_preemptions_total > 0
    assert (s_a.requests.status == Status.FINISHED).all()
    assert ids(s_a.requests.num_output_tokens) == ids(s_a.requests.output_tokens)


def test_pipeline_micro_batches_hold_disjoint_requests() -> None:
    t = table([8, 8, 8, 8], [5, 5, 5, 5])
    s = Scheduler(SchedulerConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=16), 100, t,
                  num_micro_batches=2)
    for i in range(4):
        s.add_request(i, 0.0)
    p0 = s.schedule(0.0, micro_batch=0)
    p1 = s.schedule(0.0, micro_batch=1)
    assert ids(p0.request_index) == [0, 1] and ids(p1.request_index) == [2, 3]
    with pytest.raises(ValueError, match="already has a plan in flight"):
        s.schedule(0.0, micro_batch=1)
    s.on_plan_done(p0, 1.0)
    p0 = s.schedule(1.0, micro_batch=0)  # r2, r3 are still in flight in slot 1
    assert ids(p0.request_index) == [0, 1] and ids(p0.num_new_tokens) == [1, 1]
    s.on_plan_done(p1, 1.5)
    p1 = s.schedule(1.5, micro_batch=1)
    assert ids(p1.request_index) == [2, 3]
    assert not set(ids(p0.request_index)) & set(ids(p1.request_index))


def test_pipeline_bubble_when_kv_limits_the_running_set() -> None:
    t = table([8, 8], [5, 5])
    s = Scheduler(SchedulerConfig(block_size=4), 3, t, num_micro_batches=2)
    s.add_request(0, 0.0)
    s.add_request(1, 0.0)
    p0 = s.schedule(0.0, micro_batch=0)
    assert ids(p0.request_index) == [0]  # r1 needs 2 blocks, only 1 left
    assert s.schedule(0.0, micro_batch=1) is None  # nothing to fill the second slot
    assert s.num_plans_in_flight == 1
