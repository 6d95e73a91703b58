"""The engine's step-row buffer hands StepRecords the same rows, in the same order, as
appending and extending them one by one."""

from __future__ import annotations

import numpy as np

from emulator.metrics.records import StepRecords
from emulator.simulator.engine import _StepBuffer


def _row(step: int, micro_batch: int = 0) -> tuple:
    return (1, step, micro_batch, 0.5 * step, 0.5 * step + 0.25, 3, 40, 2, 0.2, 0.05,
            17 + step, 99, micro_batch)


def _run(step0: int, k: int) -> dict:
    end = 10.0 + np.arange(k, dtype=np.float64)
    return dict(replica=0, first_step=step0, num_requests=5, kv_blocks_total=64, end_s=end,
                compute_s=0.75 + 0.0 * end, comm_s=0.125 + 0.0 * end,
                kv_blocks_used=np.arange(k, dtype=np.int64) + 30)


def test_flush_matches_direct_records() -> None:
    # a run first, singles, two adjacent runs, a single at the end
    ops = [("run", _run(0, 3)), ("row", _row(3)), ("row", _row(4, 1)), ("run", _run(5, 2)),
           ("run", _run(7, 4)), ("row", _row(11))]
    buf, direct = _StepBuffer(), StepRecords()
    for kind, x in ops:
        if kind == "row":
            buf.rows.append(x)
            direct.append(*x[:12], micro_batch=x[12])
        else:
            buf.add_run(**x)
            k = x["end_s"].size
            direct.extend(replica=np.full(k, x["replica"]),
                          step=x["first_step"] + np.arange(k), stage=np.zeros(k, np.int64),
                          start_s=x["end_s"] - (x["compute_s"] + x["comm_s"]), end_s=x["end_s"],
                          num_requests=np.full(k, 5), num_prefill_tokens=np.zeros(k, np.int64),
                          num_decode_tokens=np.full(k, 5), compute_s=x["compute_s"],
                          comm_s=x["comm_s"], kv_blocks_used=x["kv_blocks_used"],
                          kv_blocks_total=np.full(k, 64))
    got = StepRecords()
    buf.flush_into(got)
    a, b = got.to_table(), direct.to_table()
    assert a.num_rows == 12 and a.equals(b)
    assert a["step"].to_pylist() == list(range(12))
    buf.flush_into(got)  # emptied by the first flush: adds nothing
    assert len(got) == 12


def test_flush_rows_only_and_runs_only() -> None:
    for ops in ([_row(0), _row(1)], [_run(0, 2), _run(2, 1)]):
        buf, got = _StepBuffer(), StepRecords()
        for x in ops:
            buf.rows.append(x) if isinstance(x, tuple) else buf.add_run(**x)
        buf.flush_into(got)
        assert got.to_table()["step"].to_pylist() == list(range(len(got)))
