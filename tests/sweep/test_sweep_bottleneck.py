"""Bottleneck naming: the facts computed from a run's tables, and the rule's every branch."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.metrics.records import CollectiveRecords, StepRecords
from emulator.sweep.bottleneck import (BUBBLES, COMM, COMPUTE, IMBALANCE, KV, MEMORY, RunFacts,
                                       bubble_fraction, compute_bound_share, dp_imbalance,
                                       ep_wait_fraction, name_bottleneck, run_facts)


def _steps(rows):
    st = StepRecords()
    for replica, step, stage, a, b in rows:
        st.append(replica, step, stage, a, b, 1, 0, 1, b - a, 0.0, 1, 10)
    return st.to_table()


def test_bubble_fraction_exact():
    # PP=2: stage 0 busy [0,2], stage 1 busy [1,3]; the replica is busy [0,3]
    steps = _steps([(0, 0, 0, 0.0, 1.0), (0, 0, 1, 1.0, 2.0), (0, 1, 0, 1.0, 2.0),
                    (0, 1, 1, 2.0, 3.0)])
    assert bubble_fraction(steps) == pytest.approx((2 * 3 - 4) / 6)
    assert bubble_fraction(_steps([(0, 0, 0, 0.0, 1.0)])) == 0.0


def test_dp_imbalance_exact():
    steps = _steps([(0, 0, 0, 0.0, 4.0), (1, 0, 0, 0.0, 2.0)])
    assert dp_imbalance(steps) == 0.25  # spans 4 and 2: 1 - 3/4


def test_ep_wait_fraction_exact():
    steps = _steps([(0, 0, 0, 0.0, 4.0)])
    colls = CollectiveRecords()
    colls.extend(dict(replica=0, step=0, stage=0, layer=1, rank=np.array([0, 1]), axis="ep",
                      op="all_to_all", group="ep/dp0", seq=0, bytes=64,
                      entry_s=np.array([1.0, 3.0]), exit_s=np.array([3.5, 3.5])))
    # rank 0 waits 2 s, rank 1 none: 1 s per rank over a 4 s stage
    assert ep_wait_fraction(steps, colls.finalize()) == 0.25
    assert ep_wait_fraction(steps, None) == 0.0


def _one_step(prefill, decode, num_requests, kv_blocks):
    st = StepRecords()
    st.append(0, 0, 0, 0.0, 1.0, num_requests, prefill, decode, 1.0, 0.0, kv_blocks, 10**6)
    return st.to_table()


def test_roofline_side_from_the_cost_model():
    cfg = {"model": "llama-3.1-8b", "hardware": "h100", "tp": 1, "block_size": 16}
    # one 8192-token prefill chunk: GEMMs at 8192 tokens are far past the ridge point
    assert compute_bound_share(_one_step(8192, 0, 1, 512), cfg) == 1.0
    # 8 decodes over 8k cached tokens: weights and KV reads dominate
    assert compute_bound_share(_one_step(0, 8, 8, 512), cfg) == 0.0
    assert compute_bound_share(_one_step(0, 8, 8, 512), {"model": "nope"}) is None


def test_run_facts_from_tables_and_summary():
    steps = _steps([(0, 0, 0, 0.0, 4.0), (1, 0, 0, 0.0, 2.0)])
    summary = {"metrics": {"kv_peak_usage": 0.5, "num_preemptions": 3},
               "config": {"model": "tiny", "hardware": "h100", "dp": 2}}
    facts = run_facts(steps, None, summary)
    assert (facts.kv_peak_usage, facts.num_preemptions, facts.comm_share,
            facts.bubble_fraction, facts.imbalance) == (0.5, 3, 0.0, 0.0, 0.25)
    assert name_bottleneck(facts) == KV


def _facts(**kw):
    base = dict(kv_peak_usage=0.5, num_preemptions=0, comm_share=0.1, bubble_fraction=0.1,
                imbalance=0.1, compute_bound_share=0.2)
    return RunFacts(**(base | kw))


@pytest.mark.parametrize("kw, name", [
    ({"num_preemptions": 1}, KV), ({"kv_peak_usage": 0.95}, KV),
    ({"comm_share": 0.3, "bubble_fraction": 0.25}, COMM),
    ({"comm_share": 0.3, "bubble_fraction": 0.4}, BUBBLES),
    ({"imbalance": 0.2}, IMBALANCE),
    ({"comm_share": 0.19}, MEMORY), ({"compute_bound_share": 0.5}, COMPUTE),
    ({"compute_bound_share": None}, MEMORY)])
def test_rule(kw, name):
    assert name_bottleneck(_facts(**kw)) == name
