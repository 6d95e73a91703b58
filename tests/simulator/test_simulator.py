"""The simulator: fast-forward equals stepping, determinism, pipeline timing, DP replicas."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from emulator.build import build_run
from emulator.config import build_config
from emulator.simulator.engine import CostModelExecutor, Simulation
from emulator.simulator.run import simulate
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "t.arrow"
    trace = synth_trace(num_requests=60, lengths="uniform", arrival="poisson", rate=40.0,
                        prompt_tokens=(20, 400), output_tokens=(5, 300), seed=3)
    write_trace(trace, path)
    return path


def _run(path, fast_forward=True, model="tiny", **kw):
    cfg = build_config(trace=path, model=model, hardware="h100", **kw)
    return simulate(build_run(cfg), fast_forward=fast_forward)


def _assert_tables_match(a: pa.Table, b: pa.Table) -> None:
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        x = a[name].to_numpy(zero_copy_only=False)
        y = b[name].to_numpy(zero_copy_only=False)
        if x.dtype.kind == "f":
            # cumsum vs running sums: equal up to rounding
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=name)
        else:
            assert (x == y).all(), name


def test_fast_forward_equals_stepping(trace_path):
    # 8B weights leave ~0.8 GB of an H100 at 26%: a small KV pool, so runs are cut by
    # block exhaustion and requests are preempted.
    kw = dict(model="llama-3.1-8b", max_num_seqs=32, gpu_memory_utilization=0.26)
    fast = _run(trace_path, True, **kw)
    slow = _run(trace_path, False, **kw)
    assert fast.requests["num_preemptions"].to_numpy().sum() > 0
    _assert_tables_match(fast.requests, slow.requests)
    _assert_tables_match(fast.steps, slow.steps)


def test_deterministic(trace_path):
    a, b = _run(trace_path), _run(trace_path)
    assert a.requests.equals(b.requests) and a.steps.equals(b.steps)


def test_every_request_finishes_with_its_tokens(trace_path):
    out = _run(trace_path, max_num_seqs=8)
    req = out.requests
    finish = req["finish_s"].to_numpy()
    assert not np.isnan(finish).any()
    # decode tokens over all steps = output tokens - 1 per request (the first comes from
    # the prefill), plus recomputation is counted as prefill, never as decode.
    steps = out.steps
    assert steps["num_decode_tokens"].to_numpy().sum() == (req["output_tokens"].to_numpy() - 1).sum()
    assert (req["first_token_s"].to_numpy() >= req["arrival_s"].to_numpy()).all()


def test_pipeline_stages_are_ordered_and_overlap(trace_path):
    out = _run(trace_path, pp=2)
    s = out.steps
    assert set(s["stage"].to_numpy().tolist()) == {0, 1}
    rows = {}
    for rep, step, stage, start, end in zip(*(s[c].to_numpy() for c in
                                              ("replica", "step", "stage", "start_s", "end_s"))):
        rows[(rep, step, stage)] = (start, end)
    for (rep, step, stage), (start, end) in rows.items():
        assert end >= start
        if stage == 1:
            assert start >= rows[(rep, step, 0)][1]  # stage 1 starts after stage 0 ends
    # With two micro-batches in flight, stage 0 of some step starts before the previous
    # step's stage 1 ends (the pipeline overlaps).
    overlaps = [rows[(0, k, 0)][0] < rows[(0, k - 1, 1)][1]
                for k in range(1, max(k for _, k, _ in rows) + 1) if (0, k, 0) in rows]
    assert any(overlaps)


def test_dp_replicas_are_independent_and_drain_is_slowest(trace_path):
    out = _run(trace_path, dp=2, router="round_robin")
    req = out.requests
    replica = req["replica"].to_numpy()
    assert (replica[0::2] == 0).all() and (replica[1::2] == 1).all()
    steps = out.steps
    assert set(steps["replica"].to_numpy().tolist()) == {0, 1}
    finish = req["finish_s"].to_numpy()
    per_replica_last = [finish[replica == r].max() for r in (0, 1)]
    assert finish.max() == max(per_replica_last)


def test_pipeline_with_ample_kv_keeps_every_micro_batch_in_flight(tmp_path):
    # 16 equal requests on pp=4 with a nearly empty KV cache: each slot gets 4 of them and
    # the slots take turns, so 4 micro-batches are in flight at once (no bubbles but the
    # pipeline fill and the tail).
    trace = synth_trace(num_requests=16, lengths="fixed", arrival="batch", prompt_tokens=100,
                        output_tokens=50, seed=0)
    path = write_trace(trace, tmp_path / "fixed.arrow")
    setup = build_run(build_config(trace=path, model="llama-3.1-8b", hardware="h200", pp=4))
    requests = setup.new_requests()
    sim = Simulation(requests, setup.new_schedulers(requests), setup.new_router(), setup.cost)
    sim.run()
    steps = sim.steps.to_table()
    first = steps["stage"].to_numpy() == 0
    order = np.argsort(steps["start_s"].to_numpy()[first], kind="stable")
    slot = steps["micro_batch"].to_numpy()[first][order]
    start = steps["start_s"].to_numpy()[first][order]
    last = steps["stage"].to_numpy() == 3
    end = steps["end_s"].to_numpy()[last][np.argsort(steps["start_s"].to_numpy()[first], kind="stable")]
    assert np.bincount(slot).tolist() == [50, 50, 50, 50]  # a prefill and 49 decodes each
    assert slot.tolist() == [0, 1, 2, 3] * 50
    assert (steps["num_requests"].to_numpy() == 4).all()
    # When a plan enters stage 0, the 3 plans before it are still in the pipeline.
    assert all((end[k - 3:k] > start[k]).all() for k in range(3, slot.size))
    assert sim.num_events == sim._seq + 16 > 200  # heap events (>= 1 per plan) + arrivals


def _two_stage_executor(host=None, send_bytes=1000):
    """An executor whose cost model prices every plan at compute [1, 2] + comm [0.1, 0.2]
    per stage and a 0.5 s stage-to-stage transfer of ``send_bytes``."""
    work = SimpleNamespace(stages=[SimpleNamespace(pp_send_bytes=send_bytes),
                                   SimpleNamespace(pp_send_bytes=0)])
    cost = SimpleNamespace(tp=1, ep=1, step_work=lambda plan, prompt_tokens: work,
                           stage_times=lambda work, replica: (np.array([1.0, 2.0]),
                                                              np.array([0.1, 0.2]), 0.5))
    req = SimpleNamespace(prompt_tokens=np.array([10]), num_output_tokens=np.array([0]))
    ex = CostModelExecutor(cost, req, host=host)
    if host is not None:
        ex._host_terms = lambda work, pp: (0.0, np.zeros(pp))
    plan = SimpleNamespace(request_index=np.array([0]), replica=0, step=0, micro_batch=0)
    return ex, plan


def test_pipeline_transfer_is_a_rendezvous():
    ex, plan = _two_stage_executor()
    # The receiving stage is free: stage 0 is done at 1.1, the transfer ends at 1.6.
    r = ex.execute(plan, 0.0, np.array([0.0, 0.0]))
    assert r.stage_start_s.tolist() == pytest.approx([0.0, 1.6])
    assert r.stage_end_s.tolist() == pytest.approx([1.6, 3.8])
    # Stage 1 is busy until 5: stage 0 stays in its send until the recv is posted, so it is
    # not free for its next micro-batch before the transfer ends at 5.5.
    r = ex.execute(plan, 0.0, np.array([0.0, 5.0]))
    assert r.stage_start_s.tolist() == pytest.approx([0.0, 5.5])
    assert r.stage_end_s.tolist() == pytest.approx([5.5, 7.7])


def test_pipeline_wake_up_is_paid_by_the_side_that_idled():
    from emulator.cost.comm import HostOverhead

    host = HostOverhead(num_ranks=2, step_gap_s=0.0, step_fixed_s=0.0, delay_grid_s=[0.0],
                        delay_excess_s=[0.0], collective_excess_s=[0.0], wake_s=[0.0],
                        p2p_idle_grid_s=[0.0, 10.0], p2p_wake_s=[0.0, 1.0],
                        p2p_send_wake_s=[0.0, 2.0])
    ex, plan = _two_stage_executor(host)
    # Stage 1 free at 0: its recv idles 1.1 s for stage 0 -> receiver wake 0.11.
    r = ex.execute(plan, 0.0, np.array([0.0, 0.0]))
    assert r.stage_end_s[0] == pytest.approx(1.1 + 0.11 + 0.5)
    # Stage 1 busy until 5: stage 0's send idles 3.9 s -> sender wake 0.78.
    r = ex.execute(plan, 0.0, np.array([0.0, 5.0]))
    assert r.stage_end_s[0] == pytest.approx(5.0 + 0.78 + 0.5)
    assert r.stage_start_s[1] == r.stage_end_s[0]
    # A host probed faster than the benchmark shortens the transfer, never below 0.
    fast = host.model_copy(update={"p2p_send_wake_s": [-0.2, -2.0]})
    ex, plan = _two_stage_executor(fast)
    r = ex.execute(plan, 0.0, np.array([0.0, 1.2]))  # sender idles 0.1 s: 0.5 - 0.218
    assert r.stage_end_s[0] == pytest.approx(1.2 + 0.5 - 0.2 - 0.018)
    r = ex.execute(plan, 0.0, np.array([0.0, 5.0]))  # idles 3.9 s: wake -0.902, clamped
    assert r.stage_end_s[0] == pytest.approx(5.0)


def test_pipeline_wake_up_is_priced_at_the_transfers_size():
    from emulator.cost.comm import HostOverhead, P2PWakeCurves

    def curves(num_bytes, send):
        return P2PWakeCurves(num_bytes=num_bytes, wake_s=[0.0, 0.0], send_wake_s=[0.0, send],
                             recv_idle_s=[0.0, 10.0], send_idle_s=[0.0, 10.0])
    host = HostOverhead(num_ranks=2, step_gap_s=0.0, step_fixed_s=0.0, delay_grid_s=[0.0],
                        delay_excess_s=[0.0], collective_excess_s=[0.0], wake_s=[0.0],
                        p2p_idle_grid_s=[0.0, 10.0], p2p_wake_s=[0.0, 0.0],
                        p2p_send_wake_s=[0.0, 5.0],
                        p2p_by_size=[curves(1000, 1.0), curves(3000, 3.0)])
    # Stage 1 busy until 5: stage 0's send idles 3.9 s; its wake-up at 2000 bytes is
    # halfway between the two sizes' curves (0.39 and 1.17), not the main curve's (1.95).
    for send_bytes, wake in ((1000, 0.39), (2000, 0.78), (3000, 1.17), (9000, 1.17)):
        ex, plan = _two_stage_executor(host, send_bytes=send_bytes)
        r = ex.execute(plan, 0.0, np.array([0.0, 5.0]))
        assert r.stage_end_s[0] == pytest.approx(5.0 + wake + 0.5)
