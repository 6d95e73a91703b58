"""Running a sweep: each layout's run directory and row, the ranking, the written tables, the
CLI, and parallel Ray tasks giving the same rows as the in-process loop."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from emulator.cli import cli
from emulator.config import build_config
from emulator.metrics.io import read_run
from emulator.sweep.bottleneck import BUBBLES, COMM, COMPUTE, IMBALANCE, KV, MEMORY
from emulator.sweep.run import SWEEP_COLUMNS, rank_rows, run_sweep
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

NAMES = {KV, COMPUTE, MEMORY, COMM, BUBBLES, IMBALANCE}
METRICS = ("drain_time_s", "throughput_tokens_per_s", "ttft_p99_s", "tpot_p99_s",
           "kv_peak_usage", "num_preemptions")


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "batch.arrow"
    write_trace(synth_trace(num_requests=10, lengths="uniform", arrival="batch",
                            prompt_tokens=(10, 200), output_tokens=(3, 30), seed=2), path)
    return path


def _base(trace):
    return build_config(trace=trace, model="tiny", hardware="h100", max_num_batched_tokens=256)


def test_rank_rows_orders_finished_first():
    rows = [{"layout": "a", "drain_time_s": 2.0, "throughput_tokens_per_s": 5.0,
             "num_finished": 3, "num_requests": 3},
            {"layout": "b", "drain_time_s": 1.0, "throughput_tokens_per_s": 9.0,
             "num_finished": 2, "num_requests": 3},
            {"layout": "c", "drain_time_s": 3.0, "throughput_tokens_per_s": 7.0,
             "num_finished": 3, "num_requests": 3}]
    assert [(r["rank"], r["layout"]) for r in rank_rows(rows, "drain")] == [
        (1, "a"), (2, "c"), (3, "b")]
    assert [r["layout"] for r in rank_rows(rows, "throughput")] == ["c", "a", "b"]


def test_sweep_in_process_writes_runs_and_ranked_table(trace, tmp_path):
    result = run_sweep(_base(trace), 2, tmp_path, layouts=["tp2", "dp2", "pp2"], workers=1)
    assert sorted(r["layout"] for r in result.rows) == ["dp2", "pp2", "tp2"]
    drains = [r["drain_time_s"] for r in result.rows]
    assert drains == sorted(drains) and [r["rank"] for r in result.rows] == [1, 2, 3]
    for row in result.rows:
        run = read_run(row["run_dir"])
        assert run.summary["config"]["dp"] * run.summary["config"]["tp"] * \
            run.summary["config"]["pp"] == 2
        assert {k: row[k] for k in METRICS} == {k: run.summary["metrics"][k] for k in METRICS}
        assert row["bottleneck"] in NAMES
        assert (tmp_path / "runs" / row["layout"] / "timeline.json").exists()
    by_name = {r["layout"]: r for r in result.rows}
    assert by_name["pp2"]["bubble_fraction"] > 0 and by_name["tp2"]["comm_share"] > 0
    assert by_name["dp2"]["comm_share"] == 0 and by_name["dp2"]["bubble_fraction"] == 0
    table = pq.read_table(tmp_path / "sweep.parquet")
    assert table.column_names == [c for c, _ in SWEEP_COLUMNS]
    assert table.column("layout").to_pylist() == [r["layout"] for r in result.rows]
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["num_gpus"] == 2 and meta["skipped"] == [] and meta["rank_by"] == "drain"


def test_cli_prints_table_and_footnotes(trace, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(cli, ["sweep", "--trace", str(trace), "--model", "tiny",
                                   "--hardware", "h100", "--gpus", "2", "--workers", "1",
                                   "--layouts", "tp2,dp2,tp2-ep2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "layout" in res.output and "bottleneck" in res.output
    assert "skipped tp2-ep2: ep=2 needs an MoE model but tiny is dense" in res.output
    assert (out / "sweep.md").read_text().count("\n| ") == 3  # header + 2 layouts
    bad = CliRunner().invoke(cli, ["sweep", "--trace", str(trace), "--model", "tiny",
                                   "--gpus", "2", "--layouts", "dp2-nope", "-o", str(out)])
    assert bad.exit_code == 2 and "is not a layout name" in bad.output


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_parallel_ray_tasks_match_the_in_process_loop(trace, tmp_path, ray_local):
    layouts = ["tp2", "dp2", "pp2"]
    par = run_sweep(_base(trace), 2, tmp_path / "par", layouts=layouts, workers=2)
    seq = run_sweep(_base(trace), 2, tmp_path / "seq", layouts=layouts, workers=1)
    keep = ("rank", "layout", *METRICS, "comm_share", "bubble_fraction", "bottleneck")
    assert [{k: r[k] for k in keep} for r in par.rows] == \
        [{k: r[k] for k in keep} for r in seq.rows]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_emulate_mode_runs_each_layout_on_workers(trace, tmp_path, ray_local):
    base = build_config(trace=trace, model="tiny", hardware="h100", max_num_batched_tokens=256,
                        max_requests=4, max_output_tokens=4, timeout_s=10.0)
    result = run_sweep(base, 2, tmp_path, mode="emulate", layouts=["tp2", "dp2"])
    assert sorted(r["layout"] for r in result.rows) == ["dp2", "tp2"]
    by_name = {r["layout"]: r for r in result.rows}
    assert read_run(by_name["tp2"]["run_dir"]).collectives is not None
    assert read_run(by_name["dp2"]["run_dir"]).summary["mode"] == "emulate"
    assert all(r["num_finished"] == 4 for r in result.rows)
