"""The validation join (steps matched one to one, loud failure otherwise) and the report's
exact arithmetic: errors of medians, noise floor, collective instances, verdict."""

import numpy as np
import pyarrow as pa
import pytest

from emulator.cost.comm import CommEntry, CommProfile
from emulator.metrics.records import CollectiveRecords, StepRecords
from emulator.validate.join import ValidationJoinError, join_steps
from emulator.validate.report import (batch_bucket, collective_errors, collective_instances,
                                      noise_floor, step_errors)
from emulator.validate.run import verdict


def _steps(rows) -> pa.Table:
    """rows: (step, stage, num_requests, prefill, decode, start, end)."""
    rec = StepRecords()
    for step, stage, n, pf, dc, start, end in rows:
        rec.append(0, step, stage, start, end, n, pf, dc, 0.0, 0.0, 0, 10)
    return rec.to_table()


MEASURED = [(0, 0, 4, 100, 0, 0.0, 0.010), (1, 0, 4, 0, 4, 0.011, 0.013),
            (2, 0, 4, 0, 4, 0.014, 0.016), (3, 0, 4, 0, 4, 0.017, 0.020)]
PREDICTED = [(0, 0, 4, 100, 0, 0.0, 0.009), (1, 0, 4, 0, 4, 0.010, 0.012),
             (2, 0, 4, 0, 4, 0.013, 0.015), (3, 0, 4, 0, 4, 0.016, 0.018)]


def test_join_matches_steps_one_to_one():
    # Row order does not matter: the join sorts by (replica, step, stage).
    j = join_steps(_steps(MEASURED[::-1]), _steps(PREDICTED))
    assert j["step"].tolist() == [0, 1, 2, 3]
    assert j["measured_s"] == pytest.approx([0.010, 0.002, 0.002, 0.003])
    assert j["predicted_s"] == pytest.approx([0.009, 0.002, 0.002, 0.002])


def test_join_fails_loudly_on_diverged_plans():
    other = list(PREDICTED)
    other[2] = (2, 0, 3, 0, 3, 0.013, 0.015)
    with pytest.raises(ValidationJoinError, match=r"\(0, 2, 0\): num_requests is 4 emulated "
                                                  r"but 3 simulated \(1 of 4 rows differ\)"):
        join_steps(_steps(MEASURED), _steps(other))
    with pytest.raises(ValidationJoinError, match=r"different steps \(4 emulated, 3 simulated"
                                                  r" rows; emulated only: \[\(0, 3, 0\)\]"):
        join_steps(_steps(MEASURED), _steps(PREDICTED[:3]))
    with pytest.raises(ValidationJoinError, match="twice"):
        join_steps(_steps(MEASURED + MEASURED[:1]), _steps(PREDICTED))


def test_step_errors_and_noise_floor_exact():
    j = join_steps(_steps(MEASURED), _steps(PREDICTED))
    e = step_errors(j)
    # rows 10, 2, 2, 3 ms against 9, 2, 2, 2: errors -10%, 0, 0, -33%, median -5%; the
    # medians over all rows, measured 2.5 ms and predicted 2.0 ms, are 20% apart
    assert e["step_time_median_error"] == pytest.approx(-0.05)
    assert e["step_time_error_of_medians"] == pytest.approx(-0.2)
    assert e["step_time_mape"] == pytest.approx((0.1 + 0 + 0 + 1 / 3) / 4)
    assert e["step_time_bias"] == pytest.approx((-0.1 - 1 / 3) / 4)
    groups = {(g["kind"], g["batch"]): g for g in e["by_kind"]}
    assert groups[("decode", "4-7")]["median_error"] == pytest.approx(0.0)
    assert groups[("prefill", "4-7")]["median_error"] == pytest.approx(-0.1)
    # Three identical decode shapes: 2, 2, 3 ms around their median 2 ms.
    nf = noise_floor(j)
    assert nf == {"noise_floor_mape": pytest.approx(0.5 / 3), "noise_floor_num_steps": 3}
    assert batch_bucket(np.array([1, 2, 3, 4, 9])).tolist() == ["1", "2-3", "2-3", "4-7", "8-15"]


def _collectives() -> pa.Table:
    rec = CollectiveRecords()
    # One TP all-reduce of 128 KiB on ranks 0 and 1 (rank 1 enters 30 us late, both leave at
    # 130 us), one all-gather shard of 1 KiB, and a pipeline send/recv pair.
    rows = [  # rank, op, group, seq, bytes, entry, exit
        (0, "all_reduce", "tp", 0, 131072, 0.0, 130e-6), (1, "all_reduce", "tp", 0, 131072, 30e-6, 130e-6),
        (0, "all_gather", "tp", 1, 1024, 200e-6, 260e-6), (1, "all_gather", "tp", 1, 1024, 200e-6, 250e-6),
        (0, "send", "pp", 0, 4096, 300e-6, 310e-6), (1, "recv", "pp", 0, 4096, 0.0, 350e-6)]
    cols = {k: [] for k in ("rank", "op", "group", "seq", "bytes", "entry_s", "exit_s")}
    for row in rows:
        for k, v in zip(cols, row):
            cols[k].append(v)
    n = len(rows)
    rec.extend({**{k: np.array(v, dtype=object if k in ("op", "group") else None)
                   for k, v in cols.items()},
                "replica": np.zeros(n, np.int64), "step": np.zeros(n, np.int64),
                "stage": np.zeros(n, np.int64), "layer": np.full(n, -1),
                "axis": np.array(["tp"] * 4 + ["pp"] * 2, dtype=object)})
    return rec.finalize()


def test_collective_instances_and_errors():
    inst = collective_instances(_collectives(), ["a", "a"])
    order = np.argsort(inst["op"])
    got = {k: v[order].tolist() for k, v in inst.items()}
    assert got["op"] == ["all_gather", "all_reduce", "send_recv"]
    assert got["bytes"] == [2048.0, 131072.0, 4096.0]  # all_gather: gathered output
    assert got["time_s"] == pytest.approx([60e-6, 100e-6, 50e-6])  # max exit - max entry
    assert got["sync_wait_s"] == pytest.approx([0.0, 15e-6, 150e-6])
    assert got["placement"] == ["intra"] * 3
    # idle before: all_gather 70 us after both ranks left the all-reduce; the first op of a
    # step 0; the recv waited 300 us for its send.
    assert got["idle_before_s"] == pytest.approx([70e-6, 0.0, 300e-6])
    prof = CommProfile(name="h", entries=[
        CommEntry(op=o, group_size=2, placement="intra", alpha_s=a, beta_s_per_byte=0.0)
        for o, a in (("all_reduce", 110e-6), ("all_gather", 60e-6), ("send_recv", 40e-6))])
    e = collective_errors(inst, prof)
    by = {(r["op"], r["bucket"]): r["median_error"] for r in e["by_op"]}
    assert by == {("all_gather", "small"): pytest.approx(0.0),
                  ("all_reduce", "large"): pytest.approx(0.1),
                  ("send_recv", "small"): pytest.approx(-0.2)}
    assert e["collective_median_error_large"] == pytest.approx(0.1)
    assert e["collective_median_error_small"] == pytest.approx(-0.2)  # largest magnitude
    # A host probed faster than the benchmark (negative wake-up) lowers the prediction,
    # down to 0 at most: all-reduce 110 - 20 us, all-gather 60 - 20 us, send/recv 40 - 50 us.
    from emulator.cost.comm import HostOverhead
    host = HostOverhead(num_ranks=2, step_gap_s=0.0, step_fixed_s=0.0, delay_grid_s=[0.0],
                        delay_excess_s=[0.0], collective_excess_s=[-2e-5], wake_s=[-2e-5],
                        p2p_idle_grid_s=[0.0], p2p_wake_s=[-5e-5])
    e = collective_errors(inst, prof.model_copy(update={"host": host}))
    pred = {(r["op"], r["bucket"]): r["predicted_median_s"] for r in e["by_op"]}
    assert pred == {("all_gather", "small"): pytest.approx(40e-6),
                    ("all_reduce", "large"): pytest.approx(90e-6),
                    ("send_recv", "small"): 0.0}


def test_collective_error_is_the_median_of_the_instances_errors_across_sizes():
    """Half the all-gathers of 6 MB (predicted 3.0 ms), half of 8 MB (4.0 ms), each size
    measured around its prediction (within -10% and +18%). The error of the bucket's two
    medians takes the slowest small and the fastest large one (3.3 and 3.4 ms; 3.0 and 4.0
    predicted: +4.5%), the paired median does not (+0.3%)."""
    from emulator.validate.report import median_paired_error
    pred = np.array([3.0] * 4 + [4.0] * 4) * 1e-3
    meas = np.array([2.7, 2.9, 3.1, 3.3, 3.4, 3.9, 4.1, 4.6]) * 1e-3
    inst = {"op": np.array(["all_gather"] * 8), "group_size": np.full(8, 2),
            "placement": np.array(["intra"] * 8), "bytes": np.repeat([6e6, 8e6], 4),
            "time_s": meas, "sync_wait_s": np.zeros(8)}
    prof = CommProfile(name="h", entries=[CommEntry(
        op="all_gather", group_size=2, placement="intra", alpha_s=0.0, beta_s_per_byte=0.5e-9)])
    (row,) = collective_errors(inst, prof)["by_op"]
    assert row["num_sizes"] == 2 and row["num_instances"] == 8
    assert row["error_of_medians"] == pytest.approx(3.5 / 3.35 - 1)
    expect = float(np.median(pred / meas) - 1)
    assert row["median_error"] == pytest.approx(expect) and abs(expect) < 0.01
    # one size: the paired median is the error of the median (odd count)
    assert median_paired_error(np.full(3, 2.0), np.array([1.0, 4.0, 2.5])) == pytest.approx(-0.2)
    assert median_paired_error(np.ones(2), np.zeros(2)) is None


def test_verdict_line():
    report = {"step_time_median_error": -0.05, "drain_time_error": 0.12,
              "collective_median_error_large": None, "step_time_mape": 0.2,
              "noise_floor_mape": 0.18}
    assert verdict(report) == ("FAIL (drain time |12.0%| > 10%): step time median -5.0%, "
                               "drain time +12.0%, collective median large n/a; per-step MAPE "
                               "20.0% vs noise floor 18.0%")


def test_host_probes_around_a_run_average_and_drift(tmp_path):
    from emulator.cost.comm import HostOverhead
    from emulator.validate.run import probe_drift

    before = HostOverhead(num_ranks=2, step_gap_s=1e-3, step_fixed_s=2e-5,
                          collective_call_s=1e-5, delay_grid_s=[0.0, 1e-3],
                          delay_excess_s=[0.0, 2e-6], collective_excess_s=[1e-5, 3e-5],
                          wake_s=[0.0, 1e-4], p2p_idle_grid_s=[0.0, 1e-2],
                          p2p_wake_s=[1e-5, 5e-5], p2p_send_wake_s=None)
    after = before.model_copy(update={"step_gap_s": 3e-3, "wake_s": [0.0, 3e-4],
                                      "collective_call_s": 3e-5})
    mean = before.averaged(after)
    assert (mean.step_gap_s, mean.collective_call_s) == pytest.approx((2e-3, 2e-5))
    assert mean.wake_s == pytest.approx([0.0, 2e-4])
    assert mean.p2p_wake_s == pytest.approx([1e-5, 5e-5]) and mean.p2p_send_wake_s is None
    assert mean.delay_grid_s == before.delay_grid_s
    # a 100 us transfer after 1 ms idle: 200 us before, 400 us after
    assert probe_drift(before, after, 1e-4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same grids"):
        before.averaged(after.model_copy(update={"delay_grid_s": [0.0, 2e-3]}))


def test_probe_bytes_is_the_median_steps_activations(tmp_path):
    from emulator.build import build_run
    from emulator.config import build_config
    from emulator.simulator.run import simulate
    from emulator.trace.io import write_trace
    from emulator.trace.synth import synth_trace
    from emulator.validate.run import probe_bytes

    path = write_trace(synth_trace(num_requests=6, lengths="fixed", arrival="batch",
                                   prompt_tokens=40, output_tokens=9, seed=0),
                       tmp_path / "b.arrow")
    config = build_config(trace=path, model="tiny", tp=2)
    steps = simulate(build_run(config)).steps
    tokens = steps["num_prefill_tokens"].to_numpy() + steps["num_decode_tokens"].to_numpy()
    model = build_run(config).model
    # one prefill step of 240 tokens, then 8 decode steps of 6
    assert sorted(tokens.tolist()) == [6] * 8 + [240]
    assert probe_bytes(config) == 6 * model.hidden_size * model.dtype_bytes


def test_probe_plan_is_shaped_like_the_median_step(tmp_path):
    from emulator.build import build_run
    from emulator.config import build_config
    from emulator.trace.io import write_trace
    from emulator.trace.synth import synth_trace
    from emulator.validate.run import probe_plan

    path = write_trace(synth_trace(num_requests=6, lengths="fixed", arrival="batch",
                                   prompt_tokens=40, output_tokens=9, seed=0),
                       tmp_path / "b.arrow")
    config = build_config(trace=path, model="tiny", pp=2)
    num_bytes, work, largest, quartiles = probe_plan(config)
    setup = build_run(config)
    # two micro-batches of 3: the median step is a decode of 3 requests, the largest the
    # prefill of 3 prompts of 40 tokens
    token_bytes = setup.model.hidden_size * setup.model.dtype_bytes
    assert num_bytes == 3 * token_bytes
    assert largest == 3 * 40 * token_bytes
    assert quartiles == (num_bytes,)  # decodes of 3 at both quartiles too
    assert (work.num_tokens, work.num_sampled_tokens) == (3, 3)
    assert len(work.stages) == 2 and work.stages[0].pp_send_bytes == num_bytes
    assert work.stages[1].post_compute_s > 0 and work.stages[0].pre_compute_s > 0


def test_probe_plan_quartiles_are_the_sizes_of_the_runs_transfers(tmp_path):
    from emulator.build import build_run
    from emulator.config import build_config
    from emulator.simulator.run import simulate
    from emulator.trace.io import write_trace
    from emulator.trace.synth import synth_trace
    from emulator.validate.run import probe_plan

    path = write_trace(synth_trace(num_requests=4, lengths="uniform", arrival="batch",
                                   prompt_tokens=(40, 40), output_tokens=(2, 12), seed=0),
                       tmp_path / "b.arrow")
    config = build_config(trace=path, model="tiny", pp=2)
    setup = build_run(config)
    steps = simulate(setup).steps
    tokens = steps["num_prefill_tokens"].to_numpy() + steps["num_decode_tokens"].to_numpy()
    # two micro-batches of 2, their requests finishing at different steps: per stage row,
    # 10 decodes of 1, 20 of 2 and 4 prefills of 80 tokens
    assert sorted(tokens.tolist()) == [1] * 10 + [2] * 20 + [80] * 4
    token_bytes = setup.model.hidden_size * setup.model.dtype_bytes
    plan = probe_plan(config)
    assert plan.quartile_bytes == (token_bytes, 2 * token_bytes)  # lower quartile, median
    assert plan.num_bytes == 2 * token_bytes and plan.largest_bytes == 80 * token_bytes
