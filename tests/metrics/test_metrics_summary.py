"""Metrics on hand-made tables, with exact values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rich.console import Console

from emulator.metrics.format import format_seconds, summary_table
from emulator.metrics.records import CollectiveRecords, RequestRecords, StepRecords
from emulator.metrics.summary import METRIC_KEYS, build_summary, compute_metrics

DESIGN_METRICS = ["drain_time_s", "throughput_tokens_per_s", "ttft_p50_s", "ttft_p99_s",
                  "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s", "num_preemptions",
                  "kv_peak_usage"]


def three_requests(finish_c: float = 6.0):
    # a: ttft 1, tpot 4/4 = 1, e2e 5; b: ttft 0.5, tpot 2/4 = 0.5, e2e 2.5;
    # c: ttft 2, one output token (no tpot), e2e 4.
    return RequestRecords.from_arrays(
        request_id=["a", "b", "c"], replica=[0, 0, 1], arrival_s=[0.0, 1.0, 2.0],
        first_token_s=[1.0, 1.5, 4.0], finish_s=[5.0, 3.5, finish_c],
        prompt_tokens=[10, 20, 30], output_tokens=[5, 5, 1],
        num_preemptions=[0, 2, 1]).to_table()


def steps():
    rec = StepRecords()
    for kv_used, kv_total, compute_s in ((3, 10, 0.5), (8, 16, 0.25), (0, 0, 0.125)):
        rec.append(0, 0, 0, 0.0, 1.0, 1, 0, 1, compute_s, 0.0625, kv_used, kv_total)
    return rec.to_table()


def test_metrics_on_three_requests_exact():
    m = compute_metrics(three_requests(), steps())
    assert set(DESIGN_METRICS) <= set(m) and set(m) == set(METRIC_KEYS)
    assert m["num_requests"] == 3 and m["num_finished"] == 3
    assert m["drain_time_s"] == 6.0                      # last finish 6 - first arrival 0
    assert m["throughput_tokens_per_s"] == 11 / 6        # 5 + 5 + 1 output tokens
    assert m["total_throughput_tokens_per_s"] == 71 / 6  # + 60 prompt tokens
    # numpy linear percentiles: p50 of [0.5, 1, 2] = 1; p99 = 1 + 0.98 * (2 - 1)
    assert m["ttft_p50_s"] == 1.0
    assert m["ttft_p99_s"] == pytest.approx(1.98, abs=1e-12)
    assert m["tpot_p50_s"] == 0.75                       # of [0.5, 1]
    assert m["tpot_p99_s"] == pytest.approx(0.995, abs=1e-12)
    assert m["e2e_p50_s"] == 4.0                         # of [2.5, 4, 5]
    assert m["e2e_p99_s"] == pytest.approx(4.98, abs=1e-12)
    assert m["num_preemptions"] == 3
    assert m["kv_peak_usage"] == 0.5                     # 8/16; the empty pool row is skipped
    assert m["compute_s"] == 0.875 and m["comm_s"] == 0.1875
    assert "by_axis" not in m


def test_unfinished_requests_are_left_out_and_undefined_metrics_are_none():
    m = compute_metrics(three_requests(finish_c=math.nan), steps())
    assert m["num_finished"] == 2
    assert m["drain_time_s"] == 5.0
    assert m["throughput_tokens_per_s"] == 10 / 5
    assert m["e2e_p50_s"] == 3.75
    none = compute_metrics(three_requests().slice(0, 0), steps().slice(0, 0))
    assert none["drain_time_s"] is None and none["ttft_p50_s"] is None
    assert none["kv_peak_usage"] is None and none["num_requests"] == 0


def collectives():
    rec = CollectiveRecords()
    rec.extend(dict(replica=0, step=0, stage=0, layer=0, rank=np.array([0, 1, 0, 1]),
                    axis="tp", op="all_reduce", group="tp/dp0", seq=np.array([0, 0, 1, 1]),
                    bytes=64, entry_s=np.array([1.0, 1.5, 4.0, 4.0]),
                    exit_s=np.array([2.0, 2.0, 4.5, 4.5])))
    rec.extend(dict(replica=0, step=0, stage=np.array([0, 1]), layer=-1, rank=np.array([0, 2]),
                    axis="pp", op=np.array(["send", "recv"], object), group="pp/0>1", seq=0,
                    bytes=64, entry_s=np.array([5.0, 4.0]), exit_s=np.array([5.25, 5.5])))
    return rec.finalize()


def test_per_axis_totals_per_rank():
    m = compute_metrics(three_requests(), steps(), collectives())
    # tp: 2 instances over 2 ranks; durations 1 + 0.5 + 0.5 + 0.5, sync-wait 0.5 (rank 0 in
    # the first), transfer 0.5 per row (every exit is 0.5 s after the last entry)
    assert m["by_axis"]["tp"] == {"num_ops": 2, "comm_s": 1.25, "sync_wait_s": 0.25,
                                  "transfer_s": 1.0}
    # pp: one send/recv instance; durations 0.25 + 1.5, sync 0 + 1, transfer 0.25 + 0.5
    assert m["by_axis"]["pp"] == {"num_ops": 1, "comm_s": 0.875, "sync_wait_s": 0.5,
                                  "transfer_s": 0.375}


def test_build_summary_fields_and_versions():
    s = build_summary(complete=True, mode="emulate", config={"dilation": 10.0},
                      metrics={"drain_time_s": 1.0}, nodes={"0": "node-a"}, extra={"k": 1})
    assert s["complete"] is True and s["mode"] == "emulate"
    assert s["config"] == {"dilation": 10.0} and s["nodes"] == {"0": "node-a"}
    assert s["extra"] == {"k": 1} and s["metrics"] == {"drain_time_s": 1.0}
    assert set(s["versions"]) == {"emulator", "python", "numpy", "pyarrow", "torch", "ray"}
    assert s["versions"]["numpy"] == np.__version__
    with pytest.raises(ValueError, match="mode must be one of"):
        build_summary(complete=True, mode="run", config={}, metrics=None, nodes=None, extra=None)


def test_build_summary_dumps_pydantic_config():
    pydantic = pytest.importorskip("pydantic")

    class Cfg(pydantic.BaseModel):
        dilation: float = 2.0

    s = build_summary(complete=False, mode="simulate", config=Cfg(), metrics=None, nodes=None,
                      extra=None)
    assert s["config"] == {"dilation": 2.0} and s["complete"] is False


def test_summary_table_renders_metrics():
    m = compute_metrics(three_requests(), steps(), collectives())
    console = Console(record=True, width=140)
    console.print(summary_table(build_summary(complete=False, mode="simulate", config={},
                                              metrics=m)))
    text = console.export_text()
    assert "simulate run (INCOMPLETE)" in text
    assert "1.8 tok/s" in text and "11.8 tok/s" in text
    assert "1.000 s / 1.980 s" in text          # TTFT p50 / p99
    assert "750.000 ms / 995.000 ms" in text    # TPOT
    assert "50.0 %" in text and "3 / 3" in text
    assert "tp: comm / sync-wait / transfer per rank" in text
    assert "1.250 s / 250.000 ms / 1.000 s" in text


def test_summary_table_shows_how_the_ranks_waited():
    modes = [{"spin_s": 5e-5, "spinners": 1, "realtime": True},
             {"spin_s": 5e-5, "spinners": 1, "realtime": True}]
    m = compute_metrics(three_requests(), steps(), collectives())
    console = Console(record=True, width=140)
    console.print(summary_table(build_summary(complete=True, mode="emulate", config={},
                                              metrics=m, extra={"host_mode": modes})))
    assert "delays slept (50.0 µs spun); 2 idle spinners; real-time priority" in \
        console.export_text()
    from emulator.metrics.format import host_mode_text
    assert host_mode_text([{"spin_s": None, "spinners": 0, "realtime": False}] * 2) \
        == "delays spun; 0 idle spinners; normal priority; not pinned"
    assert host_mode_text([modes[0], {**modes[0], "realtime": False}]).endswith(
        "real-time priority on 1 of 2 ranks; not pinned")
    assert host_mode_text([{**modes[0], "cpu": 1}, {**modes[0], "cpu": 0}]).endswith(
        "; pinned to CPUs 1,0")
    assert host_mode_text([{**modes[0], "tcp_congestion": "bbr"}] * 2).endswith(
        "; not pinned; TCP bbr")


def test_format_seconds_units():
    assert [format_seconds(v) for v in (None, 2.0, 0.0125, 2.5e-6)] == \
        ["-", "2.000 s", "12.500 ms", "2.5 µs"]
