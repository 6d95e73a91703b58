"""Steady-decode fast-forward: k steps at once leave exactly the state of k single steps."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.core import RequestTable, Scheduler, SchedulerConfig, Status

TICK_S = 2.0 ** -10  # dyadic step times keep sums exact, so both drivers agree to the bit


def step_s(num_requests: int, num_tokens: int) -> float:
    return TICK_S * (4 + num_requests + num_tokens // 8)


def workload(seed: int, n: int = 60) -> RequestTable:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, 300, n)
    hashes = [list(range(100 * (i % 3), 100 * (i % 3) + p // 16)) if i % 2 == 0 else None
              for i, p in enumerate(prompts.tolist())]
    arrivals = np.sort(np.round(rng.uniform(0, 2.0, n) / TICK_S) * TICK_S)
    arrivals[: n // 2] = 0.0  # a burst, then a trickle
    return RequestTable.from_columns([f"q{i}" for i in range(n)], arrivals, prompts,
                                     rng.integers(1, 400, n), hashes)


def drive(t: RequestTable, *, fast: bool, num_blocks: int = 120) -> tuple[Scheduler, dict]:
    cfg = SchedulerConfig(block_size=16, max_num_batched_tokens=512, max_num_seqs=24)
    s = Scheduler(cfg, num_blocks, t)
    nxt, now = 0, 0.0
    stats = {"schedule_calls": 0, "run_steps": 0, "run_finished": 0}
    while nxt < len(t) or s.has_work:
        while nxt < len(t) and t.arrival_s[nxt] <= now:
            s.add_request(nxt, now)
            nxt += 1
        if fast:
            k = s.steady_decode_horizon(10_000)
            dur = step_s(s.num_running, s.num_running)
            if k and s.num_waiting == 0 and nxt < len(t):  # stop at the next arrival
                k = min(k, int(np.ceil((t.arrival_s[nxt] - now) / dur)))
            if k > 0:
                ends = now + dur * np.arange(1, k + 1)
                used = s.decode_run_kv_blocks_used(k)
                done = s.advance_decode_run(k, ends)
                if done.size == 0:
                    assert used[-1] == s.kv_blocks_used
                now = float(ends[-1])
                stats["run_steps"] += k
                stats["run_finished"] += done.size
                continue
        p = s.schedule(now)
        if p is None:
            now = float(t.arrival_s[nxt])
            continue
        stats["schedule_calls"] += 1
        now += step_s(p.num_requests, p.num_tokens)
        s.on_plan_done(p, now)
    return s, stats


def snapshot(s: Scheduler) -> dict:
    kv = s.kv
    n = len(s.requests)
    return {**{k: v.copy() for k, v in s.requests.state_arrays().items()},
            "free_queue": kv.pool.free_queue_order(), "ref_cnt": kv.pool.ref_cnt.copy(),
            "cache": dict(kv.pool._block_of), "num_steps": s.num_steps,
            "preemptions": s.num_preemptions_total,
            "tables": [kv.block_table(i).tolist() for i in range(n)],
            "prefix": (kv.num_prefix_queries, kv.prefix_query_tokens, kv.prefix_hit_tokens)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_forward_equals_step_by_step(seed: int) -> None:
    slow, slow_stats = drive(workload(seed), fast=False)
    fast, fast_stats = drive(workload(seed), fast=True)
    a, b = snapshot(slow), snapshot(fast)
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key
    assert (slow.requests.status == Status.FINISHED).all()
    # the workload exercises what the fast path must get right
    assert slow.num_preemptions_total > 0
    assert fast_stats["run_steps"] > 3 * fast_stats["schedule_calls"]
    assert fast_stats["run_finished"] > 5


def test_horizon_limits_and_bulk_block_order() -> None:
    # 3 decoders with contexts 15, 16, 20 after their prompts; block_size 16
    t = RequestTable.from_columns(["a", "b", "c"], [0.0] * 3, [15, 16, 20], [80, 80, 9])
    s = Scheduler(SchedulerConfig(block_size=16), 8, t)
    for i in range(3):
        s.add_request(i, 0.0)
    assert s.steady_decode_horizon(100) == 0  # prompts still to compute
    s.on_plan_done(s.schedule(0.0), 1.0)  # blocks a:[0] b:[1] c:[2,3]; 4 free
    assert s.decode_contexts().tolist() == [15, 16, 20]
    # new blocks (0-based run steps): a at 1, 17, ..; b at 0, 16, ..; c at 12, ..
    # c samples its last token 8 steps on: the run stops there.
    assert s.steady_decode_horizon(100) == 8
    assert s.decode_run_kv_blocks_used(8).tolist() == [5, 6, 6, 6, 6, 6, 6, 6]
    done = s.advance_decode_run(8, 1.0 + np.arange(1, 9))
    assert done.tolist() == [2] and t.finish_s[2] == 9.0
    assert s.kv.block_table(0).tolist() == [0, 5] and s.kv.block_table(1).tolist() == [1, 4]
    assert s.kv.pool.free_queue_order().tolist() == [6, 7, 3, 2]  # c freed tail first
    # contexts 23, 24, 4 free blocks: b needs one at steps 8, 24, 40; a at 9, 25, 41: the
    # 5th block would be needed at step 40, so 40 steps fit
    assert s.steady_decode_horizon(100) == 40
    assert s.steady_decode_horizon(7) == 7
    with pytest.raises(ValueError, match="exceeds steady_decode_horizon"):
        s.advance_decode_run(100, np.zeros(100))


def test_horizon_cache_is_dropped_when_the_state_changes() -> None:
    # The horizon is cached for blocks_used/advance; an arrival that could be admitted next
    # step must invalidate it, so advancing by the old horizon is refused.
    t = RequestTable.from_columns(["a", "b", "c"], [0.0] * 3, [15, 16, 20], [80, 80, 40])
    s = Scheduler(SchedulerConfig(block_size=16), 64, t)
    s.add_request(0, 0.0)
    s.add_request(1, 0.0)
    s.on_plan_done(s.schedule(0.0), 1.0)
    k = s.steady_decode_horizon(30)
    assert k == 30
    assert s.decode_run_kv_blocks_used(3).tolist() == [3, 4, 4]
    s.add_request(2, 1.0)  # the head fits: no run may start before it is admitted
    assert s.decode_run_kv_blocks_used(1).tolist() == [3]  # still right after the change
    with pytest.raises(ValueError, match="exceeds steady_decode_horizon=0"):
        s.advance_decode_run(k, np.arange(k, dtype=np.float64))
    assert s.steady_decode_horizon(30) == 0
