"""The microbenchmark, the calibration and a validation end to end on a local Ray (gloo,
2 ranks, tiny sizes). Behaviour only: row counts, placements, file contents; no timings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emulator.calibrate.bench import run_bench, summarize
from emulator.calibrate.host import HostProbe
from emulator.calibrate.run import calibrate
from emulator.config import build_config
from emulator.cost.profile_io import load_profile
from emulator.metrics.io import read_run
from emulator.runtime.worker import host_tcp_congestion
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace
from emulator.validate.run import probe_bytes, probe_plan, revalidate, validate

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def raw(ray_local):
    return run_bench(["all_reduce", "all_gather", "all_to_all", "send_recv"], [1024, 65536],
                     [2], num_iters=3, num_warmup=1, timeout_s=20.0)


def test_bench_rows_per_op_size_and_iteration(raw):
    assert raw.num_rows == 4 * 2 * 3
    assert set(raw["placement"].to_pylist()) == {"intra"}
    assert set(raw["group_size"].to_pylist()) == {2}
    assert (raw["time_s"].to_numpy() > 0).all()
    summary = summarize(raw)
    assert summary.num_rows == 8 and set(summary["num_iters"].to_pylist()) == {3}


def test_calibrate_cli_fits_a_saved_bench(raw, tmp_path):
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from emulator.cli import cli

    pq.write_table(raw, tmp_path / "bench.parquet")
    out = tmp_path / "host.json"
    res = CliRunner().invoke(cli, ["calibrate", "--from-bench", str(tmp_path / "bench.parquet"),
                                   "--no-host-probe", "--name", "ci", "-o", str(out)])
    assert res.exit_code == 0, res.output
    profile = load_profile(out)
    assert profile.name == "ci" and profile.host is None
    assert {(e.op, e.group_size) for e in profile.entries} == {
        ("all_reduce", 2), ("all_gather", 2), ("all_to_all", 2), ("send_recv", 2)}


def test_calibrate_then_validate(raw, tmp_path, monkeypatch):
    path = tmp_path / "host.json"
    profile, points = calibrate(raw, name="ci", output=path)
    assert load_profile(path) == profile
    assert {(e.op, e.group_size) for e in profile.entries} == {
        ("all_reduce", 2), ("all_gather", 2), ("all_to_all", 2), ("send_recv", 2)}
    assert len(points) == 8
    host = profile.host
    assert host is not None and host.num_ranks == 2
    assert len(host.delay_excess_s) == len(host.delay_grid_s)
    assert len(host.p2p_wake_s) == len(host.p2p_idle_grid_s) == len(host.p2p_send_wake_s) \
        == len(host.p2p_recv_idle_s) == len(host.p2p_send_idle_s)
    assert host.delay_gap_s > 0.0  # the probe's stages ran delays one after another

    trace = tmp_path / "batch.arrow"
    write_trace(synth_trace(num_requests=4, lengths="uniform", arrival="batch",
                            prompt_tokens=(8, 24), output_tokens=(2, 4), seed=2), trace)
    cfg = build_config(trace=trace, model="tiny", tp=2, dilation=20.0, comm_profile=path,
                       timeout_s=10.0, memory_scale=1e-3)
    report = validate(cfg, tmp_path / "val", host_probe=False)
    saved = json.loads((tmp_path / "val" / "validation.json").read_text())
    assert saved["verdict"] == report["verdict"]
    assert saved["verdict"].startswith(("PASS", "FAIL"))
    # TP: the thermometer probes ran (one per step), were left out of the collectives
    # validated, and re-priced the run; the errors as calibrated are kept beside.
    probe = saved["thermometer"]["all_reduce"]
    steps = read_run(tmp_path / "val" / "emulate").steps
    tokens = np.sort(steps["num_prefill_tokens"].to_numpy()
                     + steps["num_decode_tokens"].to_numpy())
    token_bytes = probe_bytes(cfg) // int(tokens[(tokens.size - 1) // 2])  # lower median's
    assert probe["num_instances"] == saved["num_steps"]
    assert probe["bytes"] == np.median(tokens) * token_bytes  # each its own step's size
    assert saved["thermometer_shift_s"]["all_gather"] == pytest.approx(
        probe["shift_s"] * cfg.dilation)
    assert "with the run's thermometer" in saved["verdict"]
    assert saved["as_calibrated"]["verdict"].startswith(("PASS", "FAIL"))
    assert (tmp_path / "val" / "simulate-thermometer" / "steps.parquet").exists()
    for key in ("step_time_median_error", "drain_time_error", "collective_median_error_small",
                "noise_floor_mape", "ttft_p50_error", "e2e_p90_error"):
        assert key in saved
    assert np.isfinite(saved["drain_time_error"])
    assert (tmp_path / "val" / "validation.png").stat().st_size > 0
    assert (tmp_path / "val" / "emulate" / "collectives.parquet").exists()

    # With the host probe: once before and once after the emulation, at the run's message
    # size; priced with their mean; both and their drift reported (probes stubbed here).
    import emulator.calibrate.run as calibrate_run

    # The logits all-gather's line is re-measured by each probe at the run's size (the
    # median step's logits) and priced with the mean factor.
    probes = [HostProbe(host, {"all_gather": 0.8}),
              HostProbe(host.model_copy(update={"step_gap_s": 3 * host.step_gap_s}),
                        {"all_gather": 1.0})]
    calls = []

    def fake_probe(world, prof, **kw):
        calls.append((kw["num_bytes"], kw["gather_bytes"]))
        assert kw["gap_model"] == (cfg.model, cfg.hardware)
        assert kw["pipeline_template"] is None  # TP only: no transfers to shape the probe for
        return probes[len(calls) - 1]

    monkeypatch.setattr(calibrate_run, "probe_host", fake_probe)
    validate(cfg, tmp_path / "val2")
    shard = probe_plan(cfg)[1].stages[-1].logits_gather_bytes
    gathered = 2 * shard
    assert shard > 0 and calls == [(probe_bytes(cfg), shard)] * 2
    saved = json.loads((tmp_path / "val2" / "validation.json").read_text())
    # the emulation ran the loop whose gap the probes price: each plan after its step
    summary = json.loads((tmp_path / "val2" / "emulate" / "summary.json").read_text())
    assert cfg.run_ahead and summary["config"]["run_ahead"] is False
    assert saved["host_probes"]["before"]["step_gap_s"] == host.step_gap_s
    assert saved["host_probes"]["after"]["step_gap_s"] == 3 * host.step_gap_s
    assert saved["host_probes"]["drift"] == 0.0  # wake-up curves equal
    assert saved["host_probes"]["line_factors"]["mean"] == {"all_gather": pytest.approx(0.9)}
    priced = load_profile(tmp_path / "val2" / "host-profile.json")
    assert priced.host.step_gap_s == pytest.approx(2 * host.step_gap_s)
    for op, factor in (("all_gather", 0.9), ("all_reduce", 1.0)):
        assert priced.time_s(op, 2, "intra", gathered) == pytest.approx(
            factor * profile.time_s(op, 2, "intra", gathered))
    # ... and the congestion control the ranks' sockets had, which the verdict names when
    # it is BBR (it paces a socket by the socket's own history)
    tcp = host_tcp_congestion()
    assert saved.get("tcp_congestion") == ([tcp] if tcp else None)
    bbr = "; the ranks' TCP is bbr (paced by each socket's history)" if tcp == "bbr" else ""
    assert saved["verdict"].endswith("host drift +0.0% between the probes; all_gather line "
                                     "x0.90 re-measured around the run" + bbr)

    # Re-reported from the same emulation without the thermometer: priced as calibrated
    # (the same errors the report kept beside), host probes kept, no stale re-pricing.
    again = revalidate(tmp_path / "val2", thermometer=False)
    assert "thermometer_shift_s" not in again and "as_calibrated" not in again
    for key in ("step_time_median_error", "drain_time_error"):
        assert again[key] == pytest.approx(saved["as_calibrated"][key])
    assert again["host_probes"] == saved["host_probes"]
    assert not (tmp_path / "val2" / "simulate-thermometer").exists()
    assert json.loads((tmp_path / "val2" / "validation.json").read_text())["verdict"] \
        == again["verdict"]
    assert again["verdict"].endswith("all_gather line x0.90 re-measured around the run" + bbr)
    # Re-reported with the calibrated profile: the probes are reported, not priced, and the
    # verdict does not claim the re-measured line.
    other = revalidate(tmp_path / "val2", path, thermometer=False)
    assert other["host_probes"]["line_factors_applied"] is False
    assert other["host_probes"]["line_factors"] == saved["host_probes"]["line_factors"]
    assert "re-measured" not in other["verdict"]


def test_validate_pp_prices_the_round_trip_with_the_drivers_speed(raw, tmp_path, monkeypatch):
    import emulator.calibrate.run as calibrate_run

    path = tmp_path / "host.json"
    profile, _ = calibrate(raw, name="ci", output=path, host_probe=False)
    trace = tmp_path / "batch.arrow"
    write_trace(synth_trace(num_requests=4, lengths="uniform", arrival="batch",
                            prompt_tokens=(8, 24), output_tokens=(2, 4), seed=2), trace)
    cfg = build_config(trace=trace, model="tiny", pp=2, dilation=1.0, comm_profile=path,
                       timeout_s=10.0, memory_scale=1e-3)
    # A probed host whose gap probe saw the driver busy 1 ms a step (stubbed probes).
    from emulator.cost.comm import HostOverhead

    host = HostOverhead(num_ranks=2, step_gap_s=2e-3, step_gap_driver_s=1e-3,
                        step_fixed_s=0.0, delay_grid_s=[0.0, 1e-2], delay_excess_s=[0.0, 0.0],
                        collective_excess_s=[0.0, 0.0], wake_s=[0.0, 0.0])
    seen = []
    # the probes write KV rows as the run's steps do: the median step's, of the run's size
    from emulator.build import build_run
    from emulator.runtime.shards import ELEMENT_BYTES
    block_elems = build_run(cfg).memory.kv_bytes_per_block_per_rank // ELEMENT_BYTES
    row_elems = max(1, round(block_elems * 1e-3 / cfg.block_size))

    def fake_probe(world, prof, **kw):
        seen.append(kw["pipeline_gap"])
        assert len(kw["pipeline_template"].stages) == 2  # the run's step shapes the probe
        assert kw["kv_rows"] == kw["pipeline_template"].num_tokens
        assert kw["kv_row_elems"] == row_elems
        return HostProbe(host, {})

    monkeypatch.setattr(calibrate_run, "probe_host", fake_probe)
    saved = validate(cfg, tmp_path / "val")
    assert seen == [True, True]  # PP: the gap is the pipeline's round trip
    control = json.loads((tmp_path / "val" / "emulate" / "summary.json").read_text())[
        "extra"]["control"]
    busy = control["driver_busy_s"] / control["num_steps"]
    assert saved["driver_thermometer"] == pytest.approx(
        {"run_busy_per_step_s": busy, "probe_busy_per_step_s": 1e-3, "factor": busy / 1e-3})
    assert f"pipeline round trip x{busy / 1e-3:.2f} by the driver's speed" in saved["verdict"]
    assert saved["as_calibrated"]["verdict"].startswith(("PASS", "FAIL"))
    # the re-priced simulation starts each micro-batch's next step that much later
    sim = read_run(tmp_path / "val" / "simulate-thermometer").summary["metrics"]
    calibrated = read_run(tmp_path / "val" / "simulate").summary["metrics"]
    assert (sim["drain_time_s"] > calibrated["drain_time_s"]) == (busy > 1e-3)
    # re-reported from disk: the run's driver time comes back from its summary
    again = revalidate(tmp_path / "val")
    assert again["driver_thermometer"] == pytest.approx(saved["driver_thermometer"])
    assert "driver_thermometer" not in revalidate(tmp_path / "val", thermometer=False)
